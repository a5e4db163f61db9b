"""Two-stage meta-training of the hypernet (MALMEN §4.2, used unchanged by HORSE).

Owns `meta_step` (one meta-gradient), `train_hypernet` (the loop: batches, Adam, clipping, progress bar,
logged losses, periodic checkpoints, resume, early stopping on a validation split). The files it writes (the
hypernet, and the optimizer state beside it: safetensors + JSON, no pickle) are horse/checkpoint.py's.

One meta-step on a batch of edit requests (each with a rephrase and a locality prompt):
  1. capture K^l, G^l on the unedited model (no grad through the LM)              hooks.capture
  2. predict R^l, spread R̂^l, solve ΔW^l, all without grad                         Editor.predict
  3. run the edited model (W + ΔW, via output hooks: no weight is written) and back-propagate
     L = Σ_minibatch CE(rephrase → target) + loc_coef · Σ_minibatch L_loc, where L_loc is the CE of the
     locality prompt → its own answer ("horse") or KL(pre-edit ‖ edited) at those tokens ("malmen");
     this gives Γ^l = ∂L/∂W^l                                                       delta_hooks
  4. ∂L/∂R̂^l = K(KᵀK + λI)⁻¹Γ^l and ∂L/∂λ_l                                         solve.ridge_backward
  5. ∂L/∂R^l through the spread                                                      spread.spread_backward
  6. recompute R^l in token chunks with grad through the hypernet, back-propagate ⟨∂L/∂R^l, R^l⟩
The LM graph (step 3) and the hypernet graph (step 6) never exist at the same time. Losses are summed over
LM mini-batches of per-mini-batch means, as the reference does.

    editor = train_hypernet(model, tok, train_requests, hyper=HyperConfig(...), train=TrainConfig(...),
                            out_path="hypernet.safetensors", val_requests=val)

Tests: `python -m pytest tests/horse/test_metagrad.py tests/horse/test_metatrain.py -q`.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from horse.checkpoint import load_optimizer, optimizer_path, save_optimizer
from horse.editor import Editor, Prediction, eval_mode, lm_batches, model_device
from horse.errors import EngineError
from horse.hooks import Captured, answer_ce, answer_logits, delta_hooks, frozen_parameters
from horse.hypernet import HyperConfig, layer_residuals
from horse.solve import ridge_backward
from horse.spread import spread_backward
from horse.types import EditRequest

log = logging.getLogger(__name__)

LMBatch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # input_ids_BT, attention_mask_BT, labels_BT
EditContext = Callable[[], AbstractContextManager]


@dataclass(frozen=True)
class TrainConfig:
    """Meta-training settings.

    Attributes:
        steps: meta-steps to run (each on `n_edits` requests).
        n_edits: edit requests per meta-step.
        lr: Adam learning rate (reference 1e-5).
        max_grad_norm: clip of the hypernet gradient norm.
        lm_batch_size: requests per LM mini-batch (capture and losses).
        checkpoint_every: save the hypernet and optimizer every so many steps (0: only at the end).
        val_every: evaluate the validation loss every so many steps (0: never).
        val_edits: validation requests per evaluation (the first ones of the split, fixed).
        patience: stop after this many evaluations without a better validation loss (0: never stop).
        update_normaliser: merge every batch into the running normaliser (the reference does).
        train_lambda: also train λ's log per layer (`lamda_L`); the reference keeps λ fixed at exp(lamda_init).
        max_nonfinite_steps: stop after this many steps whose capture or hypernet gradient was not finite (each
            is skipped before the normaliser or the optimizer sees it; 0: never stop); the card says "non-finite".
        seed: data order and hypernet initialisation.
        time_limit_s: stop cleanly after the step that ends past this many seconds of this run (None: no
            limit); the best validation state is kept as at any other stop, and the card says "time-limit".
    """

    steps: int = 100
    n_edits: int = 100
    lr: float = 1e-5
    max_grad_norm: float = 1.0
    lm_batch_size: int = 25
    checkpoint_every: int = 50
    val_every: int = 0
    val_edits: int = 100
    patience: int = 0
    update_normaliser: bool = True
    train_lambda: bool = False
    max_nonfinite_steps: int = 10
    seed: int = 0
    time_limit_s: float | None = None


# --------------------------------------------------------------------------- the losses


@dataclass
class MetaBatch:
    """Tokenised loss inputs of one meta-step: rephrase → target and locality prompt → locality answer."""

    gen: list[LMBatch]
    loc: list[LMBatch]


def encode_meta_batch(
    tok: PreTrainedTokenizerBase, requests: Sequence[EditRequest], lm_batch_size: int, device: torch.device
) -> MetaBatch:
    """Every rephrase of each request (its prompt when it has none) → its target; every locality pair."""
    gen_prompts, gen_answers, loc_prompts, loc_answers = [], [], [], []
    for r in requests:
        for prompt in r.rephrases or (r.prompt,):
            gen_prompts.append(prompt)
            gen_answers.append(r.target)
        if r.locality_prompt and r.locality_answer:
            loc_prompts.append(r.locality_prompt)
            loc_answers.append(r.locality_answer)
    gen = lm_batches(tok, gen_prompts, gen_answers, lm_batch_size, device)
    loc = lm_batches(tok, loc_prompts, loc_answers, lm_batch_size, device) if loc_prompts else []
    return MetaBatch(gen, loc)


def kl_to_reference(ref_logits_NX: torch.Tensor, logits_NX: torch.Tensor) -> torch.Tensor:
    """KL(pre-edit ‖ edited) summed over the vocabulary, averaged over the N tokens (MALMEN's kl_div)."""
    ref = ref_logits_NX.float().log_softmax(-1)
    new = logits_NX.float().log_softmax(-1)
    return F.kl_div(new, ref, reduction="batchmean", log_target=True)


def meta_loss_terms(
    model: nn.Module, batch: MetaBatch, edited: EditContext, *, variant: str, loc_coef: float
) -> Iterator[tuple[str, torch.Tensor]]:
    """The terms of the meta-loss, one per LM mini-batch: ("gen", CE) then ("loc", loc_coef · L_loc).

    Args:
        model: the base model.
        batch: the tokenised rephrase and locality pairs.
        edited: a factory of the context in which `model` computes as the edited model.
        variant: "horse" (locality CE to its answer) or "malmen" (KL to the pre-edit model).
        loc_coef: weight of the locality terms.

    Yields:
        (kind, scalar loss with its graph); the sum of all terms is the meta-loss L.
    """
    for input_ids, attn, labels in batch.gen:
        with edited():
            yield "gen", answer_ce(model, input_ids, attn, labels)
    for input_ids, attn, labels in batch.loc:
        if variant == "malmen":
            mask = labels != -100
            with torch.no_grad():
                ref = answer_logits(model, input_ids, attn, mask)
            with edited():
                yield "loc", loc_coef * kl_to_reference(ref, answer_logits(model, input_ids, attn, mask))
        else:
            with edited():
                yield "loc", loc_coef * answer_ce(model, input_ids, attn, labels)


# --------------------------------------------------------------------------- one meta-step


@dataclass
class StepResult:
    """Losses (summed over LM mini-batches) and stage timings of one meta-step."""

    gen_loss: float
    loc_loss: float
    grad_norm: float = float("nan")
    timings_s: dict[str, float] = field(default_factory=dict)
    is_finite: bool = True  # False: the capture held NaN/Inf and the step was skipped before the normaliser

    @property
    def loss(self) -> float:
        return self.gen_loss + self.loc_loss


def edited_model_gradients(
    model: nn.Module, prediction: Prediction, module_names: Sequence[str], batch: MetaBatch, *,
    variant: str, loc_coef: float, need_grad: bool = True,
) -> tuple[list[torch.Tensor], float, float]:
    """Stage 1b: the meta-loss of the edited model and Γ^l = ∂L/∂ΔW^l (K×V per layer).

    Returns:
        (Γ per layer (zeros when `need_grad` is False), gen loss, loc loss).
    """
    device = model_device(model)
    deltas_KV = [s.to_dense().detach().to(device).requires_grad_(need_grad) for s in prediction.solutions]
    leaves = dict(zip(module_names, deltas_KV))
    gammas = [torch.zeros_like(d) for d in deltas_KV]
    totals = {"gen": 0.0, "loc": 0.0}
    with frozen_parameters(model), eval_mode(model), torch.set_grad_enabled(need_grad):
        for kind, loss in meta_loss_terms(model, batch, lambda: delta_hooks(model, leaves), variant=variant,
                                          loc_coef=loc_coef):
            totals[kind] += float(loss.detach())
            if need_grad:
                grads = torch.autograd.grad(loss, deltas_KV, allow_unused=True)
                for gamma, g in zip(gammas, grads):
                    if g is not None:
                        gamma += g
    return gammas, totals["gen"], totals["loc"]


def hypernet_backward(editor: Editor, prediction: Prediction, gammas_KV: Sequence[torch.Tensor], *,
                      train_lambda: bool = False) -> None:
    """Stage 2: chain Γ^l back to the hypernet parameters and accumulate their `.grad`.

    ∂L/∂R̂^l and ∂L/∂λ_l from the ridge adjoint, ∂L/∂R^l through the spread, then the residuals are
    recomputed chunk by chunk with grad through the hypernet and ⟨∂L/∂R^l, R^l⟩ is back-propagated.
    """
    names = editor.module_names
    cap = prediction.captured
    device = editor.device
    keys = [cap.keys_NK[n].to(device) for n in names]
    grads = [cap.grads_NV[n].to(device) for n in names]
    grad_spread, grad_lams = [], []
    for k, r_hat, lam, gamma in zip(keys, prediction.spread_NV, prediction.lams, gammas_KV):
        g_r, g_lam = ridge_backward(k, r_hat, lam, gamma.to(device))
        grad_spread.append(g_r)
        grad_lams.append(g_lam)
    grad_resids = spread_backward(prediction.resids_NV, grads, grad_spread, editor.config.spread)
    chunk = editor.config.chunk_tokens
    for name, k, g, g_r, g_lam, lam in zip(names, keys, grads, grad_resids, grad_lams, prediction.lams):
        net, layer = editor.nets.net_for(name)
        stats = prediction.stats[editor.nets.slots[name][0]]
        if train_lambda:  # λ = exp(lamda): ∂L/∂lamda = λ · ∂L/∂λ (MALMEN's reference never trains λ)
            (g_lam.detach().to(net.lamda_L.dtype) * lam.to(net.lamda_L.dtype) * net.lamda_L[layer]).backward()
        for s in range(0, k.shape[0], chunk):
            r = layer_residuals(net, layer, k[s : s + chunk], g[s : s + chunk], stats, chunk)
            (g_r[s : s + chunk].to(r.dtype) * r).sum().backward()


def meta_step(
    editor: Editor, model: nn.Module, tok: PreTrainedTokenizerBase, requests: Sequence[EditRequest], *,
    lm_batch_size: int = 25, update_normaliser: bool = True, train_lambda: bool = False,
) -> StepResult:
    """One two-stage meta-gradient: fills `.grad` of the editor's parameters (zeroed first), steps nothing.

    Returns:
        the losses of the edited model before the update and the stage timings.
    """
    if editor.preserve_KK is not None or editor.protect_KK is not None:
        raise EngineError("the preservation prior and the protected keys are serving options without a "
                          "meta-gradient; call editor.set_preservation(None, 0) and "
                          "editor.set_protected_keys(None, 0) before meta-training")
    t0 = time.perf_counter()
    editor.nets.zero_grad(set_to_none=True)
    captured = editor.capture(model, tok, requests, lm_batch_size=lm_batch_size)
    timings: dict[str, float] = {"capture": time.perf_counter() - t0}
    if not is_finite_capture(captured):  # refused before the normaliser merges it: one NaN would poison it for good
        return StepResult(float("nan"), float("nan"), timings_s=timings, is_finite=False)
    prediction = editor.predict(captured, update_normaliser=update_normaliser, timings_s=timings)
    batch = encode_meta_batch(tok, requests, lm_batch_size, model_device(model))
    t1 = time.perf_counter()
    gammas, gen, loc = edited_model_gradients(
        model, prediction, editor.module_names, batch, variant=editor.config.variant, loc_coef=editor.config.loc_coef
    )
    t2 = time.perf_counter()
    hypernet_backward(editor, prediction, gammas, train_lambda=train_lambda)
    timings.update(edited_lm=t2 - t1, hypernet_backward=time.perf_counter() - t2)
    return StepResult(gen, loc, timings_s=timings)


def is_finite_capture(captured: Captured) -> bool:
    """Whether every captured key and output gradient is finite."""
    return all(bool(torch.isfinite(t).all()) for t in [*captured.keys_NK.values(), *captured.grads_NV.values()])


@torch.no_grad()
def evaluate_loss(
    editor: Editor, model: nn.Module, tok: PreTrainedTokenizerBase, requests: Sequence[EditRequest], *,
    n_edits: int, lm_batch_size: int = 25,
) -> StepResult:
    """Meta-loss on `requests` in batches of `n_edits` (normaliser frozen, no gradients), summed per batch
    and averaged over batches."""
    gens, locs = [], []
    for s in range(0, len(requests), n_edits):
        chunk = requests[s : s + n_edits]
        with torch.enable_grad():
            captured = editor.capture(model, tok, chunk, lm_batch_size=lm_batch_size)
        prediction = editor.predict(captured, update_normaliser=False)
        batch = encode_meta_batch(tok, chunk, lm_batch_size, model_device(model))
        _, gen, loc = edited_model_gradients(
            model, prediction, editor.module_names, batch, variant=editor.config.variant,
            loc_coef=editor.config.loc_coef, need_grad=False,
        )
        gens.append(gen)
        locs.append(loc)
    return StepResult(sum(gens) / max(len(gens), 1), sum(locs) / max(len(locs), 1))


# --------------------------------------------------------------------------- the loop


def requests_sha256(requests: Sequence[EditRequest]) -> str:
    """Hash of the training requests (content and order), recorded in the hypernet card."""
    h = hashlib.sha256()
    for r in requests:
        h.update(json.dumps(asdict(r), sort_keys=True, ensure_ascii=False).encode())
    return h.hexdigest()


def _schedule(n_requests: int, n_edits: int, seed: int, step: int) -> list[int]:
    """Indices of the requests of meta-step `step`: epochs of a seeded permutation, in order (resumable)."""
    per_epoch = max(n_requests // n_edits, 1)
    epoch, slot = divmod(step, per_epoch)
    order = list(range(n_requests))
    random.Random(seed * 100_003 + epoch).shuffle(order)
    return order[slot * n_edits : slot * n_edits + n_edits]


def train_hypernet(
    model: nn.Module, tok: PreTrainedTokenizerBase, train_requests: Sequence[EditRequest], *,
    hyper: HyperConfig | None = None, train: TrainConfig | None = None, out_path: str | Path | None = None,
    val_requests: Sequence[EditRequest] | None = None, resume: bool = False, data_sha256: str | None = None,
    progress: bool = True, editor: Editor | None = None,
) -> Editor:
    """Meta-train a hypernet for `model` and return the editor (the best one on validation, if any).

    Args:
        model, tok: the base model and tokenizer (fp32 or bf16, any device).
        train_requests: requests with rephrases and locality pairs (the training split only).
        hyper: the editor's settings (new editors only).
        train: the loop's settings.
        out_path: hypernet file; written every `checkpoint_every` steps and at the end, with
            `<out>.optim.safetensors` (optimizer + progress) and `<out>.log.jsonl` (one line per step).
        val_requests: validation split for the validation loss / early stopping.
        resume: continue from `out_path` and its optimizer file.
        data_sha256: hash of the training data file (default: hash of the requests).
        progress: show a progress bar.
        editor: start from this editor instead of a new one.

    Returns:
        the trained editor (its normaliser frozen: `update_normaliser` is False).
    """
    train = train or TrainConfig()
    if len(train_requests) < 1:
        raise EngineError("no training requests; give a data file with at least one record")
    out = Path(out_path) if out_path is not None else None
    torch.manual_seed(train.seed)
    start_step = 0
    best: tuple[float, dict[str, torch.Tensor]] | None = None
    evals_without_gain = 0
    if resume:
        if out is None or not out.exists() or not optimizer_path(out).exists():
            raise EngineError(f"--resume needs {out} and {out and optimizer_path(out)} from an earlier run; "
                              "drop --resume to start afresh")
        editor = Editor.from_checkpoint(out, model)
    elif editor is None:
        editor = Editor.new(model, hyper or HyperConfig(seed=train.seed))
    params = [p for p in editor.nets.parameters()]
    opt = torch.optim.Adam(params, lr=train.lr)
    if resume:
        assert out is not None
        state = load_optimizer(optimizer_path(out), opt, params)
        start_step = int(state["step"])
        evals_without_gain = int(state.get("evals_without_gain", 0))
        for g in opt.param_groups:
            g["lr"] = train.lr
    data_hash = data_sha256 or requests_sha256(train_requests)
    log_file = out.with_name(out.name + ".log.jsonl") if out else None
    n_edits = min(train.n_edits, len(train_requests))

    def save(step: int, reason: str) -> None:
        if out is None:
            return
        meta = {"training": {"data_sha256": data_hash, "step": step, "train": asdict(train), "reason": reason}}
        editor.save(out, extra_metadata=meta)
        save_optimizer(optimizer_path(out), opt, params,
                       {"step": step, "evals_without_gain": evals_without_gain,
                        "best_val_loss": best[0] if best else None})

    bar = tqdm(range(start_step, train.steps), desc="meta-train", disable=not progress, initial=start_step,
               total=train.steps)
    step = start_step
    stop_reason = "final"
    n_nonfinite = 0
    started = time.perf_counter()
    for step in bar:
        batch = [train_requests[i] for i in _schedule(len(train_requests), n_edits, train.seed, step)]
        result = meta_step(editor, model, tok, batch, lm_batch_size=train.lm_batch_size,
                           update_normaliser=train.update_normaliser, train_lambda=train.train_lambda)
        if result.is_finite:
            result.grad_norm = float(torch.nn.utils.clip_grad_norm_(params, train.max_grad_norm))
        if result.is_finite and math.isfinite(result.grad_norm):
            opt.step()
        else:
            n_nonfinite += 1
            log.warning("step %d: non-finite %s, update skipped (%d of at most %s)", step + 1,
                        "hypernet gradient" if result.is_finite else "capture (kept out of the normaliser)",
                        n_nonfinite, train.max_nonfinite_steps or "unlimited")
        record = {"step": step + 1, "gen_loss": result.gen_loss, "loc_loss": result.loc_loss,
                  "grad_norm": result.grad_norm, **{f"time_{k}_s": v for k, v in result.timings_s.items()}}
        if val_requests and train.val_every and (step + 1) % train.val_every == 0:
            val = evaluate_loss(editor, model, tok, list(val_requests)[: train.val_edits], n_edits=n_edits,
                                lm_batch_size=train.lm_batch_size)
            record.update(val_gen_loss=val.gen_loss, val_loc_loss=val.loc_loss, val_loss=val.loss)
            if best is None or val.loss < best[0]:
                best = (val.loss, {k: v.detach().clone() for k, v in editor.nets.state_dict().items()})
                evals_without_gain = 0
            else:
                evals_without_gain += 1
        bar.set_postfix(gen=f"{result.gen_loss:.3f}", loc=f"{result.loc_loss:.3f}",
                        **({"val": f"{record['val_loss']:.3f}"} if "val_loss" in record else {}))
        log.info("meta-step %s", json.dumps(record))
        if log_file is not None:
            with open(log_file, "a") as f:
                f.write(json.dumps(record) + "\n")
        if train.checkpoint_every and (step + 1) % train.checkpoint_every == 0 and step + 1 < train.steps:
            save(step + 1, "periodic")
        if train.max_nonfinite_steps and n_nonfinite >= train.max_nonfinite_steps:
            log.error("stopping at step %d: %d non-finite steps; check the model and the data", step + 1, n_nonfinite)
            stop_reason = "non-finite"
            break
        if train.patience and evals_without_gain >= train.patience:
            log.info("early stop at step %d: no validation gain in %d evaluations", step + 1, train.patience)
            stop_reason = "early-stop"
            break
        if train.time_limit_s is not None and time.perf_counter() - started >= train.time_limit_s \
                and step + 1 < train.steps:
            log.info("time limit of %.0f s reached at step %d", train.time_limit_s, step + 1)
            stop_reason = "time-limit"
            break
    bar.close()
    final_step = step + 1 if train.steps > start_step else start_step
    if best is not None:
        editor.nets.load_state_dict(best[1])
    save(final_step, stop_reason)
    editor.update_normaliser = False
    return editor
