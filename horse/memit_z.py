"""MEMIT step 1: the target vectors z (the reference's `compute_z`, paper eq. 16), all facts of a batch at once.

z_i = h_i^L + δ_i for every fact i: δ_i is added to the output of the LAST edited layer's MLP at the subject's last
token, for the edit prompt under each context template, and optimised with Adam (`lr`, ≤ `max_steps` steps) on
−log P(target | template ⧺ prompt) averaged over the templates + `kl_factor` · KL on "{subject} is a" +
`v_weight_decay` · ‖δ‖/‖h‖², with ‖δ‖ clamped to `clamp_norm_factor` ‖h‖. The loss is read at the model's output
(the reference's `v_loss_layer` = the last block). Adam is elementwise and the losses are summed, so one δ per
fact optimised together equals MEMIT's one-fact-at-a-time loop. h^L is the residual stream after block L (the MLP
adds straight into it, so δ on the MLP output is δ on h^L).

Speed: nothing before a row's lookup token depends on δ (causal attention), so the keys and values of those
tokens are computed once per batch and every step runs only the rest of each sequence (`_Prefix`, within
`prefix_cache_mib`; each batch checked once against the whole forward with a δ the size of h^L, and run whole
where they differ or a lookup is the first token: on SmolLM2-135M ~2× fewer CPU seconds per step). Otherwise
the blocks below L, which do not depend on δ either, are skipped by replaying blocks L… from the cached block-L
input (checked on the first mini-batch). The LM head is applied only at the scored positions.

Dimension key: B facts, S sequences, N answer tokens, V = hidden width.
Run the tests with `pytest tests/horse/test_memit.py`.
"""
from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from horse.arch import get_module, module_shape_KV
from horse.hooks import frozen_parameters
from horse.memit_config import MemitConfig
from horse.memit_rows import Rows, build_rows, hooks, pad_id
from horse.replay import block_path, final_norm, first, head_logits, replayable
from horse.types import EditRequest


def clamp_rows_BV(delta_BV: torch.Tensor, max_norm_B: torch.Tensor) -> torch.Tensor:
    """Rows of delta scaled down onto the ball ‖δ_b‖ ≤ max_norm_b (the reference's L2 projection)."""
    norms = delta_BV.norm(dim=1).clamp_min(1e-30)
    return delta_BV * torch.clamp(max_norm_B / norms, max=1.0).unsqueeze(1)


@dataclass
class _Batch:
    """One forward of the z optimisation: the facts `facts` (global indices) under one context template
    (`template` ≥ 0) or their KL prompt (`template` = −1), with what the first pass cached."""

    facts: torch.Tensor
    template: int
    rows: Rows
    block_args: tuple = ()
    block_kwargs: dict = field(default_factory=dict)
    block_input: torch.Tensor | None = None
    kl_init_logp: torch.Tensor | None = None
    prefix: _Prefix | None = None


@dataclass
class _Prefix:
    """A batch cut at each row's lookup position: the tokens before it do not depend on δ (causal attention), so
    their keys and values are computed once; every step runs only the suffix, from the lookup on.

    kv: per layer (keys, values) of the prefix; ids_SW, mask_SW: the suffix (right-padded); mask: prefix mask ⧺
    suffix mask; positions_SW: the suffix's position ids; cut_S: where each row's suffix starts."""

    kv: list[tuple[torch.Tensor, torch.Tensor]]
    ids_SW: torch.Tensor
    mask: torch.Tensor
    positions_SW: torch.Tensor
    cut_S: torch.Tensor

    def nbytes(self) -> int:
        return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in self.kv)


def _cache_kw(base: nn.Module) -> str:
    """The name the model's forward takes its KV cache by ("cache" from transformers 5.2x, else "past_key_values")."""
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


@torch.no_grad()
def _cut_at_lookup(model: nn.Module, rows: Rows, fill: int) -> _Prefix | None:
    """The batch's `_Prefix` (one forward over the prefixes), or None where a row's lookup is its first token or
    the model returns no per-layer cache (then the batch runs whole)."""
    from transformers import DynamicCache

    cut_S = rows.lookup_S
    if rows.input_ids.shape[0] == 0 or int(cut_S.min()) < 1:
        return None
    lengths_S = rows.attention_mask.sum(dim=1)
    width_p, width_s = int(cut_S.max()), int((lengths_S - cut_S).max())
    prefix_mask = (torch.arange(width_p, device=cut_S.device)[None] < cut_S[:, None]).long()
    prefix_ids = torch.where(prefix_mask.bool(), rows.input_ids[:, :width_p], fill)
    idx_SW = cut_S[:, None] + torch.arange(width_s, device=cut_S.device)[None]
    valid = idx_SW < lengths_S[:, None]
    ids_SW = torch.where(valid, rows.input_ids.gather(1, idx_SW.clamp(max=rows.input_ids.shape[1] - 1)), fill)
    positions = torch.arange(width_p, device=cut_S.device)[None].expand(len(cut_S), -1)
    out = model.base_model(input_ids=prefix_ids, attention_mask=prefix_mask, position_ids=positions,
                           use_cache=True, **{_cache_kw(model.base_model): DynamicCache()})
    layers = getattr(getattr(out, "cache", None) or getattr(out, "past_key_values", None), "layers", None)
    if not layers or any(getattr(layer, "keys", None) is None for layer in layers):
        return None
    return _Prefix([(layer.keys, layer.values) for layer in layers], ids_SW,
                   torch.cat([prefix_mask, valid.long()], dim=1), idx_SW, cut_S)


def _z_forward(model: nn.Module, batch: _Batch, *, blocks: nn.ModuleList, z_index: int, mlp_out: nn.Module,
               delta_BV: torch.Tensor, replay: bool, capture: bool,
               prefix: _Prefix | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward of one batch with δ added at the last edited layer's MLP output, at the subject's last token.

    Runs the whole sequences, or (`replay`) blocks L… from the cached block-L input, or (`prefix`) only the
    suffixes from the lookup on, over the cached keys and values of the prefixes.

    Returns:
        (answer log-probs N, or KL-row log-softmax B × vocab for a KL batch; h^L at the lookup position of
        each row, detached, when `capture`, else an empty tensor). With `capture` the block-L input and its
        call arguments are cached on the batch so later steps can `replay` from block L.
    """
    rows = batch.rows
    seq_idx = torch.arange(rows.input_ids.shape[0], device=rows.input_ids.device)
    add_SV = delta_BV[batch.facts[rows.fact_S]]
    lookup_S = torch.zeros_like(rows.lookup_S) if prefix is not None else rows.lookup_S
    ans_pos_N = rows.ans_pos_N - prefix.cut_S[rows.ans_row_N] if prefix is not None else rows.ans_pos_N
    z_block = blocks[z_index]
    got: list[torch.Tensor] = []

    def add_delta(module, args, out):
        # eq. 16: h^L ← h^L + δ at the subject's last token (δ enters through the MLP's output)
        return out.index_put((seq_idx, lookup_S), add_SV.to(out.dtype), accumulate=True)

    def grab_input(module, args, kwargs):
        batch.block_args = tuple(args[1:])
        batch.block_kwargs = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        batch.block_input = (args[0] if args else kwargs["hidden_states"]).detach()

    def grab_output(module, args, out):
        got.append(first(out).detach()[seq_idx, lookup_S].float())

    pairs: list[tuple[nn.Module, str, object]] = [(mlp_out, "fwd", add_delta)]
    if capture:
        pairs += [(z_block, "pre_kw", grab_input), (z_block, "fwd", grab_output)]
    base = model.base_model
    with hooks(pairs):
        if prefix is not None:  # the tokens before the lookup do not depend on δ: only the suffix runs
            from transformers import DynamicCache

            hidden = base(input_ids=prefix.ids_SW, attention_mask=prefix.mask, position_ids=prefix.positions_SW,
                          use_cache=True, **{_cache_kw(base): DynamicCache(prefix.kv)}).last_hidden_state
        elif replay:  # blocks below L do not depend on δ: start from the cached block-L input
            hidden = batch.block_input
            for block in blocks[z_index:]:
                hidden = first(block(hidden, *batch.block_args, **batch.block_kwargs))
            hidden = final_norm(base)(hidden)  # type: ignore[misc]
        else:
            hidden = base(input_ids=rows.input_ids, attention_mask=rows.attention_mask,
                          use_cache=False).last_hidden_state
    h_L = got[0] if got else torch.zeros(0)
    if batch.template < 0:
        return torch.log_softmax(head_logits(model, hidden[seq_idx, lookup_S]), dim=-1), h_L
    logits = head_logits(model, hidden[rows.ans_row_N, ans_pos_N])
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
    templates = config.templates()
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
            rows = build_rows(tok, chunk, [template], None, with_answers=True).to(device)
            if t == 0:
                n_answer_B[facts] = torch.bincount(rows.fact_S[rows.ans_row_N], minlength=len(idx)).float()
            batches.append(_Batch(facts, t, rows))
        batches.append(_Batch(facts, -1, build_rows(tok, chunk, [], config.kl_template,
                                                     with_answers=False).to(device)))

    init_BV = torch.zeros(B, width, device=device)
    replay = False
    cached_bytes = 0
    fill = pad_id(tok)
    with frozen_parameters(model), torch.no_grad():
        zeros = torch.zeros(B, width, device=device)
        probe_BV = torch.randn(B, width, generator=torch.Generator().manual_seed(0)).to(device)
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
            if config.prefix_cache_mib > 0:
                prefix = _cut_at_lookup(model, batch.rows, fill)
                if prefix is not None and cached_bytes + prefix.nbytes() <= config.prefix_cache_mib * 2**20:
                    # checked against the whole forward with a δ the size of h^L at the lookup, for this batch
                    probe = probe_BV * h_L.norm(dim=1).mean() / probe_BV.norm(dim=1, keepdim=True)
                    kw = dict(blocks=blocks, z_index=z_index, mlp_out=mlp_out, delta_BV=probe, capture=False)
                    whole, _ = _z_forward(model, batch, replay=False, **kw)
                    cut, _ = _z_forward(model, batch, replay=False, prefix=prefix, **kw)
                    if torch.allclose(whole, cut, atol=1e-4, rtol=1e-4):
                        batch.prefix = prefix
                        cached_bytes += prefix.nbytes()
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
                                    delta_BV=delta_BV, replay=replay, capture=False, prefix=batch.prefix)
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
             "z_prefix_share": sum(b.prefix is not None for b in batches) / len(batches),
             "z_prefix_cache_mib": cached_bytes / 2**20,
             "z_delta_norm_ratio_mean": float((delta_BV.detach().norm(dim=1) / init_norm_B).mean())}
    return z_BV, stats
