"""MEMIT (Meng et al. 2023, "Mass-Editing Memory in a Transformer"), the baseline of issue 5.

Owns the MEMIT method on the engine's plumbing: `MemitConfig`, the per-fact target vectors z (the
"v*" optimisation), the keys at the subject's last token, the batch closed form spread over the edited
layers, and `memit_deltas`, which returns `horse.deltas.Deltas` like `Editor.compute_deltas` does, so the
eval command, the benchmark and the daemon use either method interchangeably. The covariance statistics
live in `horse/covariance.py`.

Algorithm (paper Alg. 1; equation numbers are the paper's):
1. z_i = h_i^L + δ_i for every fact i (eq. 16): δ_i is added to the output of the LAST edited layer's MLP
   at the subject's last token, for the edit prompt under each context template, and optimised with Adam
   (lr 0.5, ≤ 25 steps) on −log P(target | template ⧺ prompt) + 0.0625 · KL on "{subject} is a" +
   weight decay 1e-3 · ‖δ‖/‖h‖², with ‖δ‖ clamped to 4 ‖h‖ (the reference code's `compute_z`). All facts
   of a batch are optimised together, one δ per fact: Adam is elementwise and the losses are summed, so
   this equals MEMIT's one-fact-at-a-time loop, only batched. h^L is the residual stream after block L
   (the MLP adds straight into it, so δ on the MLP output is δ on h^L).
2. For each edited layer l, first to last (eq. 9–14): keys K (module input at the subject's last token,
   averaged over the context templates as `compute_ks` does) and the current h^L are recomputed on the
   model with the earlier layers already edited; R = (Z − H^L) / (L − l) spreads the remaining residual
   over the layers left (eq. 20); ΔW = R Kᵀ (λ C + K Kᵀ)⁻¹ (eq. 14) with λ = 15000
   (`mom2_update_weight`), C the uncentred second moment of the layer's inputs (`horse.covariance`). In
   this engine's K×V orientation: delta_KV = (λ C_KK + K_NKᵀ K_NK)⁻¹ K_NKᵀ R_NV, returned factored as
   (adj_NK, R_NV) with adj_NK = K_NK (λ C_KK + K_NKᵀ K_NK)⁻¹ (C symmetric). Solved in float64.
3. The edit is applied layer by layer while computing (step 2 needs it) and removed at the end: the model
   is always restored bit-exactly (`horse.deltas.apply_deltas`).

Context templates: MEMIT samples ten 5-token prefixes from the model; here a few fixed prefixes are used
(deterministic, no sampling), "{}" first. Speed: the forward below block L does not depend on δ, so after
the first step only blocks L… are re-run from the cached block-L input (checked against the full forward
on the first mini-batch; falls back to full forwards for an architecture where they differ), and the LM
head is applied only at the scored positions.

Dimension key: B facts, S sequences (B × templates), T positions, N = B keys, K = d_k, V = d_v (= hidden
width for an MLP output module).

    deltas, info = memit_deltas(model, tok, requests, MemitConfig.for_model(model), cache_dir=cache)

Run the tests with `pytest tests/horse/test_memit.py`; the SmolLM2 layer sweep with
`python benchmarks/studies/memit_layers.py`.
"""
from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from horse.arch import get_module, module_shape_KV, num_layers
from horse.covariance import layer_second_moments, shrink_KK
from horse.deltas import Deltas, LayerDelta, apply_deltas, fingerprint_modules
from horse.errors import EngineError, NonFiniteDelta
from horse.hooks import frozen_parameters
from horse.replay import block_path, final_norm, first, head_logits, replayable
from horse.tokens import encode_pair
from horse.types import EditRequest

DEFAULT_CONTEXT_TEMPLATES: tuple[str, ...] = (
    "{}",
    "The following is true. {}",
    "Here is a fact. {}",
    "I read this today. {}",
)

# Chosen by `benchmarks/studies/memit_layers.py` on the first 50 CounterFact val cases, one batch, λ = 15000
# (ES / PS / NS / Score % by probability; unedited 36 / 42 / 70 / 45.5): layers 3–8 74 / 74 / 70 / 72.6,
# 6–11 52 / 50 / 70 / 56.1, 12–17 62 / 56 / 72 / 62.7, 24–29 36 / 42 / 70 / 45.5 (z cannot move the answer:
# after the last block nothing reads the subject position). Results: benchmarks/results/memit_layers.json.
SMOLLM2_135M_LAYERS: tuple[str, ...] = tuple(f"model.layers.{i}.mlp.down_proj" for i in range(3, 9))

# config heads that do more than a linear map of the final hidden state (then full logits are used)
class MissingSubject(EngineError):
    """MEMIT needs the subject of every request (its keys sit at the subject's last token); give one."""


@dataclass(frozen=True)
class MemitConfig:
    """MEMIT hyperparameters (the reference code's names in brackets).

    Attributes:
        layers: HF paths of the MLP output modules to edit, ascending (`layers`); () → `default_layers`.
        lr: Adam learning rate of δ (`v_lr`).
        max_steps: optimisation steps of δ (`v_num_grad_steps`).
        kl_factor: weight of the KL term on `kl_template` (`kl_factor`).
        clamp_norm_factor: ‖δ‖ ≤ factor · ‖h^L‖ (`clamp_norm_factor`).
        v_weight_decay: weight of ‖δ‖ / ‖h^L‖² (`v_weight_decay`).
        early_stop_loss: a fact's δ stops once its loss is below this (the reference's 5e-2).
        mom2_update_weight: λ of eq. 14 (`mom2_update_weight`).
        context_templates: prefixes "…{}" applied to the prompt; the first must be "{}".
        kl_template: the essence prompt of the KL term (`"{} is a"`).
        cov_tokens_per_dim: N = this × d_k tokens of corpus text for C (issue: ≥ 10).
        cov_shrinkage: α of `shrink_KK` applied to C.
        lm_batch_size: sequences per forward pass.
    """

    layers: tuple[str, ...] = ()
    lr: float = 0.5
    max_steps: int = 25
    kl_factor: float = 0.0625
    clamp_norm_factor: float = 4.0
    v_weight_decay: float = 1e-3
    early_stop_loss: float = 5e-2
    mom2_update_weight: float = 15000.0
    context_templates: tuple[str, ...] = DEFAULT_CONTEXT_TEMPLATES
    kl_template: str = "{} is a"
    cov_tokens_per_dim: int = 20
    cov_shrinkage: float = 1e-2
    lm_batch_size: int = 64

    @classmethod
    def for_model(cls, model: nn.Module, **overrides: object) -> MemitConfig:
        """The defaults with `layers` filled in for this model (`default_layers`)."""
        config = cls(**overrides)  # type: ignore[arg-type]
        return config if config.layers else replace(config, layers=default_layers(model))


def _is_smollm2_135m(model: nn.Module) -> bool:
    c = getattr(model, "config", None)
    return (getattr(c, "model_type", None) == "llama" and getattr(c, "num_hidden_layers", None) == 30
            and getattr(c, "hidden_size", None) == 576 and getattr(c, "intermediate_size", None) == 1536
            and getattr(c, "vocab_size", None) == 49152)


def default_layers(model: nn.Module) -> tuple[str, ...]:
    """MEMIT's edited layers for this model.

    SmolLM2-135M: the window picked by the layer sweep (`SMOLLM2_135M_LAYERS`). Other models: a window of
    min(5, n/2) consecutive early-middle layers starting at ~12 % depth (MEMIT's own choices are 3–8 of 28
    for GPT-J and 13–17 of 48 for GPT-2 XL).
    """
    if _is_smollm2_135m(model):
        return SMOLLM2_135M_LAYERS
    from horse.arch import default_target_modules

    n = num_layers(model)
    every = default_target_modules(model, n_last=n)
    width = max(1, min(5, n // 2))
    first = min(n - width, max(0, round(0.12 * n)))
    return tuple(every[first:first + width])


# --------------------------------------------------------------------------- pure math


def memit_adjusted_keys_NK(keys_NK: torch.Tensor, cov_KK: torch.Tensor, lam: float) -> torch.Tensor:
    """adj_NK = K_NK (λ C_KK + K_NKᵀ K_NK)⁻¹: the keys after MEMIT's eq. 14 solve, in float64.

    Then delta_KV = adj_NKᵀ R_NV = (λC + KᵀK)⁻¹ Kᵀ R (C and KᵀK are symmetric), which is MEMIT's
    ΔW = R Kᵀ (λC + KKᵀ)⁻¹ transposed into this engine's K×V orientation.

    Args:
        keys_NK: N keys (one per fact), K wide.
        cov_KK: second moment C of the layer's inputs (shrunk), K × K, symmetric PSD.
        lam: λ (`mom2_update_weight`).

    Returns:
        adj_NK, float64.
    """
    keys = keys_NK.double()
    system_KK = lam * cov_KK.double() + keys.T @ keys
    return torch.linalg.solve(system_KK, keys.T).T


def memit_delta_KV(keys_NK: torch.Tensor, resid_NV: torch.Tensor, cov_KK: torch.Tensor,
                   lam: float) -> torch.Tensor:
    """delta_KV = (λ C_KK + K_NKᵀ K_NK)⁻¹ K_NKᵀ R_NV (MEMIT eq. 14 in K×V orientation), float64."""
    return memit_adjusted_keys_NK(keys_NK, cov_KK, lam).T @ resid_NV.double()


def spread_residual_NV(z_NV: torch.Tensor, current_NV: torch.Tensor, layer_index: int,
                       n_layers: int) -> torch.Tensor:
    """R_NV = (Z − H^L) / (L − l): the share of the remaining residual written into layer l (eq. 20).

    Args:
        z_NV: target vectors z at the last edited layer.
        current_NV: h^L on the model with layers < l already edited.
        layer_index: l, 0-based position of this layer among the edited layers.
        n_layers: L, the number of edited layers.
    """
    return (z_NV.double() - current_NV.double()) / (n_layers - layer_index)


def clamp_rows_BV(delta_BV: torch.Tensor, max_norm_B: torch.Tensor) -> torch.Tensor:
    """Rows of delta scaled down onto the ball ‖δ_b‖ ≤ max_norm_b (the reference's L2 projection)."""
    norms = delta_BV.norm(dim=1).clamp_min(1e-30)
    return delta_BV * torch.clamp(max_norm_B / norms, max=1.0).unsqueeze(1)


# --------------------------------------------------------------------------- token layout


def _subject_last_index(tok, text: str, subject: str) -> int | None:
    """Index of the subject's last token in tok(text.rstrip()) (with its special tokens), or None."""
    text = text.rstrip()
    start = text.find(subject)
    if start < 0:
        start = text.lower().find(subject.lower())
    if start < 0:
        return None
    end = start + len(subject)
    if getattr(tok, "is_fast", False):
        offsets = tok(text, return_offsets_mapping=True)["offset_mapping"]
        last = None
        for i, (a, b) in enumerate(offsets):
            if b > a and a < end:
                last = i
        return last
    # slow tokenizers: MEMIT's own rule, the length of the tokenised prefix ending with the subject
    return len(tok(text[:end])["input_ids"]) - 1


@dataclass
class _Rows:
    """Padded sequences of one mini-batch of facts.

    fact_S: which fact (index into the batch) each sequence belongs to; template_S: template index
    (−1 for the KL sequence); lookup_S: subject's last token; answer (row, position, id) triples.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    fact_S: torch.Tensor
    template_S: torch.Tensor
    lookup_S: torch.Tensor
    ans_row_N: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    ans_pos_N: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    ans_id_N: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))

    def to(self, device: torch.device) -> _Rows:
        return _Rows(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.fact_S, self.template_S,
                                               self.lookup_S, self.ans_row_N, self.ans_pos_N, self.ans_id_N)))


def _pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, :len(r)] = 1
    return ids, mask


def _pad_id(tok) -> int:
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return int(pad) if pad is not None else 0


def _lookup(tok, text: str, subject: str, request: EditRequest) -> int:
    idx = _subject_last_index(tok, text, subject)
    if idx is None:
        raise MissingSubject(f"subject {subject!r} does not occur in {text!r} (request {request.case_id}); "
                             "MEMIT needs the subject inside the prompt")
    return idx


def _build_rows(tok, requests: Sequence[EditRequest], templates: Sequence[str], kl_template: str | None,
                *, with_answers: bool) -> _Rows:
    """Sequences for a mini-batch: each fact under each template (+ answer tokens when `with_answers`),
    then (when `kl_template`) its KL prompt. Answers follow `horse.tokens.encode_pair` exactly."""
    seqs: list[list[int]] = []
    fact, tmpl, lookup = [], [], []
    ans_row, ans_pos, ans_id = [], [], []
    for b, req in enumerate(requests):
        for t, template in enumerate(templates):
            text = template.format(req.prompt)
            if with_answers:
                ids, labels = encode_pair(tok, text, req.target)
                for pos, lab in enumerate(labels):
                    if lab != -100:
                        ans_row.append(len(seqs))
                        ans_pos.append(pos)
                        ans_id.append(lab)
            else:
                ids = tok(text.rstrip())["input_ids"]
            lookup.append(_lookup(tok, text, req.subject, req))
            fact.append(b)
            tmpl.append(t)
            seqs.append(ids)
        if kl_template is not None:
            text = kl_template.format(req.subject)
            lookup.append(_lookup(tok, text, req.subject, req))
            seqs.append(tok(text.rstrip())["input_ids"])
            fact.append(b)
            tmpl.append(-1)
    ids, mask = _pad(seqs, _pad_id(tok))
    as_long = lambda xs: torch.tensor(xs, dtype=torch.long)  # noqa: E731
    return _Rows(ids, mask, as_long(fact), as_long(tmpl), as_long(lookup), as_long(ans_row), as_long(ans_pos),
                 as_long(ans_id))


# --------------------------------------------------------------------------- model plumbing


class _StopForward(Exception):
    """Raised by a hook once everything needed from a forward pass is recorded."""


@contextmanager
def _hooks(pairs: Sequence[tuple[nn.Module, str, object]]) -> Iterator[None]:
    """Register (module, kind, fn) hooks, kind in {"pre", "pre_kw", "fwd"}; all removed on exit."""
    handles = []
    try:
        for module, kind, fn in pairs:
            if kind == "pre":
                handles.append(module.register_forward_pre_hook(fn))
            elif kind == "pre_kw":
                handles.append(module.register_forward_pre_hook(fn, with_kwargs=True))
            else:
                handles.append(module.register_forward_hook(fn))
        yield
    finally:
        for h in handles:
            h.remove()


# --------------------------------------------------------------------------- step 1: z vectors


@dataclass
class _Batch:
    """One forward of the z optimisation: the facts `facts` (global indices) under one context template
    (`template` ≥ 0) or their KL prompt (`template` = −1), with what the first pass cached."""

    facts: torch.Tensor
    template: int
    rows: _Rows
    block_args: tuple = ()
    block_kwargs: dict = field(default_factory=dict)
    block_input: torch.Tensor | None = None
    kl_init_logp: torch.Tensor | None = None


def _z_forward(model: nn.Module, batch: _Batch, *, blocks: nn.ModuleList, z_index: int, mlp_out: nn.Module,
               delta_BV: torch.Tensor, replay: bool, capture: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward of one batch with δ added at the last edited layer's MLP output, at the subject's last token.

    Returns:
        (answer log-probs N, or KL-row log-softmax B × vocab for a KL batch; h^L at the lookup position of
        each row, detached, when `capture`, else an empty tensor). With `capture` the block-L input and its
        call arguments are cached on the batch so later steps can `replay` from block L.
    """
    rows = batch.rows
    seq_idx = torch.arange(rows.input_ids.shape[0], device=rows.input_ids.device)
    add_SV = delta_BV[batch.facts[rows.fact_S]]
    z_block = blocks[z_index]
    got: list[torch.Tensor] = []

    def add_delta(module, args, out):
        # eq. 16: h^L ← h^L + δ at the subject's last token (δ enters through the MLP's output)
        return out.index_put((seq_idx, rows.lookup_S), add_SV.to(out.dtype), accumulate=True)

    def grab_input(module, args, kwargs):
        batch.block_args = tuple(args[1:])
        batch.block_kwargs = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        batch.block_input = (args[0] if args else kwargs["hidden_states"]).detach()

    def grab_output(module, args, out):
        got.append(first(out).detach()[seq_idx, rows.lookup_S].float())

    hooks: list[tuple[nn.Module, str, object]] = [(mlp_out, "fwd", add_delta)]
    if capture:
        hooks += [(z_block, "pre_kw", grab_input), (z_block, "fwd", grab_output)]
    base = model.base_model
    with _hooks(hooks):
        if replay:  # blocks below L do not depend on δ: start from the cached block-L input
            hidden = batch.block_input
            for block in blocks[z_index:]:
                hidden = first(block(hidden, *batch.block_args, **batch.block_kwargs))
            hidden = final_norm(base)(hidden)  # type: ignore[misc]
        else:
            hidden = base(input_ids=rows.input_ids, attention_mask=rows.attention_mask,
                          use_cache=False).last_hidden_state
    h_L = got[0] if got else torch.zeros(0)
    if batch.template < 0:
        return torch.log_softmax(head_logits(model, hidden[seq_idx, rows.lookup_S]), dim=-1), h_L
    logits = head_logits(model, hidden[rows.ans_row_N, rows.ans_pos_N])
    return torch.log_softmax(logits, dim=-1).gather(1, rows.ans_id_N[:, None])[:, 0], h_L


def _batch_losses_B(batch: _Batch, out: torch.Tensor, n_answer_B: torch.Tensor, config: MemitConfig,
                    n_templates: int) -> torch.Tensor:
    """This batch's share of each of its facts' loss (reference `compute_z`): NLL per answer token averaged
    over the templates, or kl_factor · KL(current ‖ initial) on "{subject} is a" at the subject's last token."""
    rows = batch.rows
    if batch.template < 0:
        return config.kl_factor * (out.exp() * (out - batch.kl_init_logp)).sum(dim=1)  # type: ignore[operator]
    fact_N = rows.fact_S[rows.ans_row_N]
    nll_B = torch.zeros(len(batch.facts), dtype=out.dtype, device=out.device).index_add(0, fact_N, -out)
    return nll_B / (n_answer_B[batch.facts] * n_templates)


def compute_z_BV(model: nn.Module, tok, requests: Sequence[EditRequest], config: MemitConfig,
                 ) -> tuple[torch.Tensor, dict[str, float]]:
    """Target vectors z_b = h_b^L + δ_b at the last edited layer, all facts optimised together (eq. 16).

    Facts are sorted by prompt length and cut into groups of `lm_batch_size`; each group runs one forward
    per context template and one for the KL prompts (little padding). Per step every batch's loss is
    back-propagated at once; a fact whose total loss is below `early_stop_loss` is then frozen (its δ is
    not updated), which is the reference's per-fact `break` before the backward.

    Args:
        model: the causal LM (unchanged on return).
        tok: its tokenizer.
        requests: B facts, each with its subject inside the prompt.
        config: MEMIT settings (`layers[-1]` is where z lives).

    Returns:
        (z_BV float32, stats: mean steps, mean final loss, share converged, whether the replay was used).
    """
    device = next(model.parameters()).device
    z_layer = config.layers[-1]
    mlp_out = get_module(model, z_layer)
    blocks_path, z_index = block_path(z_layer)
    blocks = get_module(model, blocks_path)
    templates = config.context_templates
    n_t = len(templates)
    B = len(requests)
    width = module_shape_KV(mlp_out)[1]
    can_replay = replayable(model)

    order = sorted(range(B), key=lambda b: len(tok(requests[b].prompt)["input_ids"]))
    batches: list[_Batch] = []
    n_answer_B = torch.zeros(B, device=device)
    for start in range(0, B, config.lm_batch_size):
        idx = order[start:start + config.lm_batch_size]
        chunk = [requests[b] for b in idx]
        facts = torch.tensor(idx, dtype=torch.long, device=device)
        for t, template in enumerate(templates):
            rows = _build_rows(tok, chunk, [template], None, with_answers=True).to(device)
            if t == 0:
                n_answer_B[facts] = torch.bincount(rows.fact_S[rows.ans_row_N], minlength=len(idx)).float()
            batches.append(_Batch(facts, t, rows))
        batches.append(_Batch(facts, -1, _build_rows(tok, chunk, [], config.kl_template,
                                                     with_answers=False).to(device)))

    init_BV = torch.zeros(B, width, device=device)
    replay = False
    with frozen_parameters(model), torch.no_grad():
        zeros = torch.zeros(B, width, device=device)
        for i, batch in enumerate(batches):
            out, h_L = _z_forward(model, batch, blocks=blocks, z_index=z_index, mlp_out=mlp_out,
                                  delta_BV=zeros, replay=False, capture=True)
            if batch.template == 0:  # the reference's target_init: h^L on the plain prompt
                init_BV[batch.facts] = h_L
            if batch.template < 0:
                batch.kl_init_logp = out
            if i == 0 and can_replay:
                again, _ = _z_forward(model, batch, blocks=blocks, z_index=z_index, mlp_out=mlp_out,
                                      delta_BV=zeros, replay=True, capture=False)
                replay = bool(torch.allclose(out, again, atol=1e-4, rtol=1e-4))
    init_norm_B = init_BV.norm(dim=1)
    max_norm_B = config.clamp_norm_factor * init_norm_B

    delta_BV = torch.zeros_like(init_BV, requires_grad=True)
    opt = torch.optim.Adam([delta_BV], lr=config.lr)
    done_B = torch.zeros(B, dtype=torch.bool, device=device)
    steps_B = torch.zeros(B, dtype=torch.long, device=device)
    loss_B = torch.zeros(B, device=device)
    with frozen_parameters(model):
        for step in range(config.max_steps):
            is_last = step == config.max_steps - 1
            opt.zero_grad(set_to_none=False)
            active_B = ~done_B
            loss_B = torch.where(active_B, torch.zeros_like(loss_B), loss_B)
            for batch in batches:
                active = active_B[batch.facts]
                if not bool(active.any()):
                    continue
                out, _ = _z_forward(model, batch, blocks=blocks, z_index=z_index, mlp_out=mlp_out,
                                    delta_BV=delta_BV, replay=replay, capture=False)
                part = _batch_losses_B(batch, out, n_answer_B, config, n_t)
                loss_B[batch.facts[active]] += part.detach()[active]
                if not is_last:
                    part[active].sum().backward()
            # weight decay ‖δ‖ / ‖h^L‖² (the reference's v_weight_decay term)
            decay_B = config.v_weight_decay * delta_BV.norm(dim=1) / init_norm_B ** 2
            loss_B = torch.where(active_B, loss_B + decay_B.detach(), loss_B)
            if not is_last:
                decay_B[active_B].sum().backward()
            # the reference stops a fact once its loss is small, and never steps after the last forward
            done_B = done_B | (active_B & (loss_B < config.early_stop_loss))
            if is_last or bool(done_B.all()):
                break
            steps_B += (~done_B).long()
            with torch.no_grad():
                before = delta_BV.detach().clone()
                opt.step()
                # Adam moves rows through its momentum: keep finished facts' δ fixed
                delta_BV[done_B] = before[done_B]
                delta_BV.copy_(clamp_rows_BV(delta_BV, max_norm_B))
    z_BV = (init_BV + delta_BV.detach()).float()
    stats = {"z_steps_mean": float(steps_B.float().mean()), "z_final_loss_mean": float(loss_B.mean()),
             "z_converged_share": float(done_B.float().mean()), "z_replay": float(replay),
             "z_delta_norm_ratio_mean": float((delta_BV.detach().norm(dim=1) / init_norm_B).mean())}
    return z_BV, stats


# --------------------------------------------------------------------------- step 2: keys and h^L


@torch.no_grad()
def keys_and_current_z(model: nn.Module, tok, requests: Sequence[EditRequest], layer: str, z_layer: str,
                       config: MemitConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys of `layer` at the subject's last token, averaged over the context templates, and h^L.

    Keys follow the reference `compute_ks`: mean over the prefixed templates, then the mean of that and
    the plain prompt ("{}"). h^L is read at the last edited block's output on the plain prompt.

    Returns:
        (keys_BK float32, current_BV float32) on the current model.
    """
    device = next(model.parameters()).device
    module = get_module(model, layer)
    blocks_path, z_index = block_path(z_layer)
    z_block = get_module(model, blocks_path)[z_index]
    templates = config.context_templates
    per_group = max(1, config.lm_batch_size // len(templates))
    keys_parts, cur_parts = [], []
    for start in range(0, len(requests), per_group):
        chunk = requests[start:start + per_group]
        rows = _build_rows(tok, chunk, templates, None, with_answers=False).to(device)
        seq_idx = torch.arange(rows.input_ids.shape[0], device=device)
        got: dict[str, torch.Tensor] = {}

        def grab_key(mod, args):
            got["k"] = args[0][seq_idx, rows.lookup_S].float()

        def grab_z(mod, args, out):
            got["z"] = first(out)[seq_idx, rows.lookup_S].float()
            raise _StopForward

        with _hooks([(module, "pre", grab_key), (z_block, "fwd", grab_z)]):
            try:
                model(input_ids=rows.input_ids, attention_mask=rows.attention_mask, use_cache=False)
            except _StopForward:
                pass
        keys_SK = got["k"]
        keys_TBK = keys_SK.view(len(chunk), len(templates), -1).transpose(0, 1)
        keys_BK = keys_TBK[0] if len(templates) == 1 else 0.5 * (keys_TBK[0] + keys_TBK[1:].mean(dim=0))
        keys_parts.append(keys_BK)
        cur_parts.append(got["z"].view(len(chunk), len(templates), -1)[:, 0])
    return torch.cat(keys_parts), torch.cat(cur_parts)


# --------------------------------------------------------------------------- the method


def _validate(requests: Sequence[EditRequest], config: MemitConfig) -> None:
    if not requests:
        raise EngineError("no requests to edit; give at least one EditRequest")
    if not config.layers:
        raise EngineError("MemitConfig.layers is empty; use MemitConfig.for_model(model)")
    if not config.context_templates or config.context_templates[0] != "{}":
        raise EngineError(f"the first context template must be '{{}}', got {config.context_templates[:1]}")
    for r in requests:
        if not r.subject.strip():
            raise MissingSubject(f"request {r.case_id!r} ({r.prompt!r}) has no subject; MEMIT needs one")


def memit_deltas(model: nn.Module, tok, requests: Sequence[EditRequest], config: MemitConfig | None = None,
                 *, cache_dir: str | os.PathLike[str], fingerprint: str | None = None,
                 ) -> tuple[Deltas, dict[str, float | str | list[str]]]:
    """MEMIT weight deltas for a batch of facts (paper Alg. 1), the model left exactly as it was.

    Args:
        model: the causal LM, any dtype (the math is fp32 / float64).
        tok: its tokenizer.
        requests: facts to write; each needs its subject inside the prompt.
        config: MEMIT settings (None: `MemitConfig.for_model(model)`).
        cache_dir: where the covariance statistics are cached (`<cache_dir>/memit-cov/`).
        fingerprint: model fingerprint for the covariance cache key (None: sha256 of the current weights).
            Pass the base model's fingerprint when editing an already edited model to reuse the base
            statistics, as MEMIT does.

    Returns:
        (deltas, info): one factored `LayerDelta` per edited layer (delta_KV = adj_NKᵀ R_NV), and
        timings in seconds (`covariance`, `z`, `keys`, `solve`, `total`) plus the covariance corpus, N,
        shrinkage and z-optimisation statistics.

    Raises:
        MissingSubject: a request without a subject in its prompt.
        NonFiniteDelta: the solve produced NaN / Inf (nothing is applied).
    """
    config = config if config is not None else MemitConfig.for_model(model)
    if not config.layers:
        config = replace(config, layers=default_layers(model))
    _validate(requests, config)
    requests = list(requests)
    started = time.perf_counter()
    timings: dict[str, float] = {"covariance": 0.0, "z": 0.0, "keys": 0.0, "solve": 0.0}
    layers = list(config.layers)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()

    t0 = time.perf_counter()
    d_k = max(module_shape_KV(get_module(model, name))[0] for name in layers)
    raw, cov_info = layer_second_moments(model, tok, layers, cache_dir=cache_dir,
                                         n_tokens=config.cov_tokens_per_dim * d_k, fingerprint=fingerprint)
    covs = {name: shrink_KK(raw[name].to(device).double(), config.cov_shrinkage) for name in layers}
    timings["covariance"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    z_BV, z_stats = compute_z_BV(model, tok, requests, config)
    timings["z"] = time.perf_counter() - t0

    deltas: Deltas = {}
    applied = []
    resid_norms: list[float] = []
    try:
        for i, layer in enumerate(layers):
            t0 = time.perf_counter()
            keys_BK, current_BV = keys_and_current_z(model, tok, requests, layer, layers[-1], config)
            timings["keys"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            resid_BV = spread_residual_NV(z_BV, current_BV, i, len(layers))
            resid_norms.append(float((z_BV - current_BV).norm(dim=1).mean()))
            adj_BK = memit_adjusted_keys_NK(keys_BK, covs[layer], config.mom2_update_weight)
            delta = LayerDelta.from_factors(adj_BK.float(), resid_BV.float())
            if not delta.is_finite():
                raise NonFiniteDelta(f"MEMIT's delta for {layer} holds NaN/Inf; nothing was applied "
                                     "(check the covariance cache or lower the learning rate)")
            deltas[layer] = delta
            timings["solve"] += time.perf_counter() - t0
            if i < len(layers) - 1:  # the next layer's keys and residual see this layer's edit (Alg. 1)
                applied.append(apply_deltas(model, {layer: delta}))
    finally:
        for handle in reversed(applied):
            handle.remove()
        model.train(was_training)
    timings["total"] = time.perf_counter() - started
    info: dict[str, float | str | list[str]] = {**timings, **z_stats, **cov_info.as_dict(),
                                                "cov_shrinkage": config.cov_shrinkage,
                                                "layers": layers, "n_requests": float(len(requests)),
                                                "z_residual_norm_first": resid_norms[0],
                                                "z_residual_norm_last": resid_norms[-1]}
    return deltas, info


class MemitEditor:
    """MEMIT behind the editor interface the daemon uses (`module_names`, `fingerprint`, `compute_deltas`).

    Built on the unedited base model: its covariance statistics are keyed by the base's fingerprint, so
    editing an already edited head reuses them (as MEMIT does). They are computed on the base: give `tokenizer`
    (or call `warm_covariance(base, tok)`) while the model is still the base; a head edited before they are cached
    is refused (`CovarianceNotCached`) rather than measured and stored under the base's key.
    """

    from_base = False
    kind = "memit"

    def __init__(self, model: nn.Module, *, cache_dir: str | os.PathLike[str], config: MemitConfig | None = None,
                 tokenizer=None) -> None:
        from horse.covariance import model_fingerprint

        self.config = config if config is not None else MemitConfig.for_model(model)
        self.cache_dir = cache_dir
        self.fingerprint = fingerprint_modules(model, self.module_names)
        self.base_fingerprint = model_fingerprint(model)
        self.last_run: dict[str, object] = {}
        if tokenizer is not None:
            self.warm_covariance(model, tokenizer)

    def warm_covariance(self, base: nn.Module, tok) -> None:
        """Compute and cache the covariance statistics on `base` (the unedited model this editor was built on)."""
        from horse.covariance import layer_second_moments

        d_k = max(module_shape_KV(get_module(base, name))[0] for name in self.module_names)
        layer_second_moments(base, tok, self.module_names, cache_dir=self.cache_dir,
                             n_tokens=self.config.cov_tokens_per_dim * d_k, fingerprint=self.base_fingerprint)

    @property
    def module_names(self) -> list[str]:
        return list(self.config.layers)

    def card(self) -> dict:
        return {"method": self.kind, **{k: list(v) if isinstance(v, tuple) else v
                                        for k, v in dataclasses.asdict(self.config).items()}}

    def compute_deltas(self, model: nn.Module, tok, requests: Sequence[EditRequest]) -> tuple[Deltas, dict[str, float]]:
        """MEMIT deltas on `model` as it is now (the head); timings in seconds by stage."""
        deltas, info = memit_deltas(model, tok, requests, self.config, cache_dir=self.cache_dir,
                                    fingerprint=self.base_fingerprint)
        self.last_run = info
        return deltas, {k: float(info[k]) for k in ("covariance", "z", "keys", "solve", "total")}
