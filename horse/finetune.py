"""Fine-tune-the-ledger (issue 6): the slow, strong baseline a nightly hypernet editor has to beat.

Every night, from the unedited base model, fine-tune the editor's target modules (the MLP output linears
of the last six blocks) on ALL applied edits: breadth-first (the edits are cut once into seeded random
mini-batches; each epoch visits every mini-batch once, in a new order), a few epochs of Adam, with a locality
term that keeps the next-token distribution on fixed unrelated prompts close to the base model's. The unrelated
prompts come from the local corpus (`horse.covariance.corpus_texts`: training-split prompts), never from the
gate's canary set. Because every forward of the training is fixed, the input of the first trained block is
captured once and each step runs only the trained blocks and the LM head at the scored positions
(`horse/replay.py`; 2× faster than full passes on SmolLM2, `benchmarks/studies/finetune_speed.py`).

    tuner = FineTuner.new(model, FinetuneConfig(epochs=5))
    deltas, timings = tuner.compute_deltas(model, tok, requests)   # dense K×V deltas; the model is unchanged

Loss of one step, B edits in the mini-batch and L locality prompts:

    mean_b NLL(answer tokens of edit b | prompt b) + locality_weight · mean_l KL(p_base(·|l) ‖ p_θ(·|l))
        + swap_weight · mean_b KLₖ(p_base(·|s_b) ‖ p_θ(·|s_b))

where s_b is edit b's prompt asked of another edit's subject ("The mother tongue of <other subject> is"): the
same relation, a subject the edit must leave alone (what CounterFact's neighbourhood score measures, built from
the edits being trained, never from evaluation data), and KLₖ the KL over the base model's `swap_top_k` most
likely next tokens (stored per edit, so memory stays small with thousands of edits). `divergence` makes the
locality term the reverse KL(p_θ ‖ p_base) or the mean of both: the reverse one penalises what the forward one
barely sees, mass moved onto tokens the base model thinks unlikely, such as an edit's target surfacing on
unrelated prompts.

An epoch in which every answer token of every edit was already the model's top choice (before the step that
saw it) ends training early.

Warm start (`init`, what a fold does with `finetune_warm_start`): the training starts from given deltas (the
newest fold's) instead of the base weights and visits only the edits they do not recall (some answer token not
top-1) plus `rehearsal` recalled ones per such edit, at `warm_lr`; the locality and swap terms still compare
with the base model. A forward over every edit then finds what that training made the weights forget; the next
round trains everything found missing so far (with a new rehearsal), for at most `warm_rounds` rounds. The cost
follows the edits added since that fold (and what they disturb), not the whole ledger.

The daemon uses a FineTuner like a hypernet Editor (`compute_deltas`), but
because `from_base` is set it hands it every edit the head carries plus the night's, on the base weights,
and publishes the result as a snapshot whose parent is the base (see daemon/cycle.py).

The loss terms are in horse/finetune_losses.py, the prompts and fixed passes in horse/finetune_passes.py (their
names stay importable from here); the replay decisions (`replayable`, `_cache_prefix`) and the FineTuner are here.

Run the tests with `pytest tests/horse/test_finetune.py`.
"""
from __future__ import annotations

import hashlib
import logging
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from horse.arch import default_target_modules, get_module, model_device, module_weight_KV, weight_layout
from horse.deltas import Deltas, LayerDelta, add_deltas_, fingerprint_modules
from horse.errors import EngineError
from horse.finetune_losses import (DIVERGENCES, answer_hits_B, answer_nll_B, kl_from_base_B, moment_factor_KR,
                                   output_change, topk_kl_from_base_B)
from horse.finetune_losses import answer_accuracy_B  # noqa: F401 - re-exported (tests)
from horse.finetune_passes import (Pass, edit_pass, locality_prompts, pass_accuracy, pass_logits_NW, prompt_pass,
                                   rehearsal_subset, subject_swaps, top_k)
from horse.metrics import logits_at
from horse.progress import Progress, log_stage
from horse.hooks import record_keys
from horse.replay import (block_path, capture_block_input, first_block, prefix_matches, replay_hidden_BTH,
                          replayable)
from horse.tokens import chunked, tokenize_prompts, tokenize_requests
from horse.types import EditRequest

log = logging.getLogger("horse.finetune")


@dataclass(frozen=True)
class FinetuneConfig:
    """Settings of fine-tune-the-ledger. Empty `module_names` = the MLP output linears of the last
    `n_last_layers` blocks (the modules HORSE edits)."""

    module_names: tuple[str, ...] = ()
    n_last_layers: int = 6
    epochs: int = 5
    lr: float = 1e-3
    batch_size: int = 32
    locality_weight: float = 1.0
    n_locality: int = 64        # fixed unrelated prompts, sampled once from the local corpus
    locality_batch: int = 16    # of them per step, in rotation
    swap_weight: float = 0.0    # subject-swapped prompts of the mini-batch's edits (0 = off)
    swap_top_k: int = 64        # base next-token probabilities kept per swapped prompt
    swap_resample: bool = False  # a new partner subject per edit each epoch (else one, fixed)
    divergence: str = "forward"  # of the locality term: forward / reverse / symmetric KL to the base model
    preserve_weight: float = 0.0  # weight of the change of the layers' outputs on corpus inputs (needs moments)
    preserve_rank: int = 256    # ... over the moments' top eigen-directions (0 = all: 6× slower on SmolLM2)
    rehearsal: float = 1.0      # warm start (`init`): recalled edits trained again per edit not recalled
    warm_lr: float = 1e-3       # warm start: Adam's learning rate (a fresh Adam's first steps move every weight
                                # by about lr: the recalled edits the round does not train drift less)
    warm_rounds: int = 1        # warm start: scan-and-train rounds at most (stops early when all are recalled)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.preserve_rank < 0:
            raise EngineError(f"preserve_rank = {self.preserve_rank} is negative; give 0 (all directions) or more")
        if self.epochs < 1 or self.batch_size < 1 or min(self.lr, self.warm_lr) <= 0 or self.warm_rounds < 1:
            raise EngineError(f"fine-tune settings need epochs ≥ 1, batch_size ≥ 1, lr and warm_lr > 0 and "
                              f"warm_rounds ≥ 1; got epochs {self.epochs}, batch_size {self.batch_size}, lr {self.lr}, "
                              f"warm_lr {self.warm_lr}, warm_rounds {self.warm_rounds}")
        if self.divergence not in DIVERGENCES:
            raise EngineError(f"divergence = {self.divergence!r}; give one of {', '.join(DIVERGENCES)}")
        for name in ("locality_weight", "swap_weight", "rehearsal", "preserve_weight"):
            if getattr(self, name) < 0:
                raise EngineError(f"{name} = {getattr(self, name)} is negative; give a value ≥ 0")


# Here, not in finetune_passes: `replayable` and `capture_block_input` are looked up in this module (tests and
# benchmarks/studies/finetune_speed.py patch them to compare or break the replay).
def _cache_prefix(model: nn.Module, start: tuple[str, int] | None, passes: Sequence[Pass]) -> tuple[str, int] | None:
    """Capture the first trained block's input of every pass (the blocks below it are frozen, so it never
    changes). The replay is checked against a full forward on the first pass; on a mismatch (an architecture
    whose blocks take more than the replay passes on) nothing is cached and None is returned."""
    if start is None or not passes:
        return None
    with torch.no_grad():
        for p in passes:
            p.cached = capture_block_input(model, start, p.input_ids, p.attention_mask)
        full = logits_at(model, passes[0].input_ids, passes[0].attention_mask, passes[0].rows_N, passes[0].cols_N)
        replayed = pass_logits_NW(model, start, passes[0])
    if not torch.allclose(replayed, full, rtol=1e-3, atol=1e-3 * float(full.abs().max().clamp_min(1))):
        for p in passes:
            p.cached = None
        return None
    return start


class FineTuner:
    """Fine-tuning of the target modules on a set of edits, behind the editor interface (`compute_deltas`)."""

    from_base = True  # the daemon gives it every carried edit on the base weights (see module docstring)
    kind = "finetune"
    sums_supported = protects_keys = carries_normaliser = False  # see daemon.engines.JointEngine

    def __init__(self, config: FinetuneConfig, fingerprint: str, held_out: frozenset[str] = frozenset()) -> None:
        self.config = config
        self.fingerprint = fingerprint
        self.held_out = held_out  # never locality prompts (see `new`)
        self.last_run: dict[str, float] = {}  # epochs, steps, train_hit (share of edits top-1 in the last epoch)
        self.last_accuracy: list[float] | None = None  # a warm start's last scan: each request's answer-token
        #                                                accuracy with the deltas it returned (None otherwise)
        self._scans: tuple[tuple[str, int], list[Pass]] | None = None  # a warm start's replayable scans
        self._prepared: tuple[tuple[EditRequest, ...], tuple[str, int] | None, list[Pass]] | None = None
        #                 ^ `prepare_scans`: the requests, the replay start (None: full passes) and their scans
        self.moments: dict[str, torch.Tensor] = {}  # C_KK of each target module's inputs (`set_preservation`)

    def set_preservation(self, moments: Mapping[str, torch.Tensor]) -> None:
        """Second moments C = E[k kᵀ] (K×K) of every target module's inputs on the local corpus
        (`horse.covariance.preservation_moments`), for `preserve_weight`: the loss then adds preserve_weight ·
        Σ_l tr(Δ_lᵀ C_l Δ_l) / tr(W_lᵀ C_l W_l), how much the fine-tune moves each layer's output on ordinary text,
        relative to that output (what MEMIT's and HORSE's preservation prior keeps small, as a penalty), with C_l
        cut to its `preserve_rank` top eigen-directions in the numerator (`moment_factor_KR`)."""
        missing = [n for n in self.module_names if n not in moments]
        if missing:
            raise EngineError(f"no input moments for {', '.join(missing)}; compute them for every target module")
        self.moments = {n: moments[n] for n in self.module_names}

    @property
    def module_names(self) -> list[str]:
        return list(self.config.module_names)

    @classmethod
    def new(cls, model: nn.Module, config: FinetuneConfig | None = None, *,
            held_out: Sequence[str] = ()) -> FineTuner:
        """`held_out`: prompts never used as locality prompts (the daemon passes the gate's canary)."""
        config = config or FinetuneConfig()
        names = list(config.module_names) or default_target_modules(model, config.n_last_layers)
        config = replace(config, module_names=tuple(names))
        return cls(config, fingerprint_modules(model, names), frozenset(p.strip() for p in held_out))

    def card(self) -> dict:
        held = hashlib.sha256("\n".join(sorted(self.held_out)).encode()).hexdigest() if self.held_out else ""
        return {"method": self.kind, **asdict(self.config), "held_out_sha256": held,
                **({"moments": sorted(self.moments)} if self.config.preserve_weight else {})}

    def compute_deltas(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, requests: Sequence[EditRequest],
                       *, init: Mapping[str, LayerDelta] | None = None) -> tuple[Deltas, dict[str, float]]:
        """Fine-tune a copy of the target weights on `requests`; return their change (the model is restored).

        The edits are cut once into seeded random mini-batches of `batch_size`; each epoch visits every
        mini-batch once, in a new order. Every forward of the training (edit mini-batches, their swapped
        prompts, the locality prompts) is fixed, so the input of the first trained block is captured once and
        each step runs only the trained blocks and the LM head at the scored positions (`horse.replay`).

        `init`: deltas of exactly the target modules to start from (a warm start, see the module docstring): up to
        `warm_rounds` rounds, each a scan of every edit on the current weights and a training on those not recalled
        plus the rehearsal; it stops when a scan finds every edit recalled. The result includes `init` (it is the
        change from the weights the model has now).

        Returns:
            (dense fp32 K×V delta per target module; timings in seconds: prepare (base targets and the cached
            block inputs), train, total). The epochs run and steps taken are in `last_run`.
        Raises:
            EngineError: no requests, or a module that cannot be trained (no weight).
        """
        if not requests:
            raise EngineError("no edits to fine-tune on; give at least one")
        if init is not None and set(init) != set(self.module_names):
            raise EngineError(f"a warm start needs deltas of exactly the fine-tuned modules {self.module_names}; got "
                              f"{sorted(init)}")
        t0 = time.perf_counter()
        prepared, self.last_accuracy, self._scans, self._prepared = self._prepared, None, None, None
        if init is None:
            deltas, timings, self.last_run = self._train(model, tokenizer, requests, list(range(len(requests))))
            timings["total"] = time.perf_counter() - t0
            return deltas, timings
        deltas, timings = dict(init), {"prepare": 0.0, "train": 0.0, "scan": 0.0}
        run: dict[str, float] = {"epochs": 0, "steps": 0, "trained": 0, "rounds": 0}
        fragile: set[int] = set()
        if prepared is not None and prepared[0] == tuple(requests):
            start, scans = prepared[1], prepared[2]
        else:
            start, scans = self._scan_passes(model, tokenizer, requests)
        timings["scan"] = time.perf_counter() - t0
        for _ in range(self.config.warm_rounds + 1):
            t = time.perf_counter()
            accuracy = pass_accuracy(model, start, scans, deltas)
            recalled = [a == 1.0 for a in accuracy]
            timings["scan"] += time.perf_counter() - t
            run.setdefault("recalled", sum(recalled) / len(recalled))  # what the starting weights recall
            run["recalled_after"] = sum(recalled) / len(recalled)
            fragile |= {i for i, ok in enumerate(recalled) if not ok}  # trained in every later round
            order = rehearsal_subset(recalled, self.config.rehearsal, self.config.seed + int(run["rounds"]), fragile)
            if not order or run["rounds"] == self.config.warm_rounds:
                break
            deltas, round_timings, last = self._train(model, tokenizer, requests, order, init=deltas)
            for key in ("prepare", "train"):
                timings[key] += round_timings[key]
            run["rounds"] += 1
            for key in ("epochs", "steps", "trained"):
                run[key] += last[key]
            run.update(train_hit=last["train_hit"], swaps=last["swaps"], replayed=last["replayed"])
        timings["total"] = time.perf_counter() - t0
        self.last_run, self.last_accuracy = run, accuracy  # the last scan saw the returned deltas
        self._scans = (start, scans) if start is not None else None  # kept for `scan_key_moments`
        return deltas, timings

    def _scan_passes(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, requests: Sequence[EditRequest]
                     ) -> tuple[tuple[str, int] | None, list[Pass]]:
        """A warm start's scan batches of `requests` (4 × batch_size edits each) with their first fine-tuned block's
        input captured (the start; None when the model cannot be replayed: full passes)."""
        device = model_device(model)
        scans = [edit_pass(tokenize_requests(tokenizer, [requests[i] for i in chunk]).to(device))
                 for chunk in chunked(list(range(len(requests))), 4 * self.config.batch_size)]
        return _cache_prefix(model, first_block(self.module_names) if replayable(model) else None, scans), scans

    def prepare_scans(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase,
                      requests: Sequence[EditRequest]) -> None:
        """Capture the scans of a warm start on `requests` now, on `model` at its (base) weights: the next
        `compute_deltas(…, init=…)` on the same requests uses them, and `scan_accuracy` replays them on other
        weights above the first fine-tuned block (a fold measures the head it replaces so)."""
        self._prepared = (tuple(requests), *self._scan_passes(model, tokenizer, requests))

    def scan_accuracy(self, model: nn.Module, reference: nn.Module) -> list[float] | None:
        """Per request of `prepare_scans`, in order: the answer-token accuracy (teacher-forced) of `model` as it
        is, replayed from the block inputs captured on `reference` (the model `prepare_scans` was given). None
        when nothing is prepared, the model cannot be replayed, or `model` differs from `reference` below the first
        fine-tuned block (then its block inputs differ too: measure it by forward passes)."""
        if self._prepared is None or self._prepared[1] is None:
            return None
        _, start, scans = self._prepared
        if not prefix_matches(model, reference, start):
            return None
        return pass_accuracy(model, start, scans, {})

    def scan_key_moments(self, model: nn.Module, module_names: Sequence[str]) -> dict[str, torch.Tensor] | None:
        """Per module of `module_names`, KᵀK (K×K, float64) of its inputs at the answer positions of every request
        of the last warm start (what `Editor.requests_second_moments` takes by full forward passes), on `model`
        as it is, replayed from the block inputs that warm start captured: valid when the blocks below its first
        fine-tuned block are the base's. Then forgets those inputs. None when there are none (no warm start, no
        replay) or a module lies below that block."""
        scans, self._scans = self._scans, None
        if scans is None:
            return None
        start, passes = scans
        if any(block_path(n)[0] != start[0] or block_path(n)[1] < start[1] for n in module_names):
            return None
        total: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for p in passes:
                mask_BT = torch.zeros(p.input_ids.shape, dtype=torch.bool, device=p.input_ids.device)
                mask_BT[p.rows_N, p.cols_N] = True
                with record_keys(model, module_names, mask_BT, keep_outputs=False) as caps:
                    replay_hidden_BTH(model, start, p.cached)
                for name in module_names:
                    k_NK = caps[name].keys_NK[-1].double()
                    total[name] = total[name] + k_NK.T @ k_NK if name in total else k_NK.T @ k_NK
        return total

    def _train(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, requests: Sequence[EditRequest],
               order: list[int], init: Mapping[str, LayerDelta] | None = None,
               ) -> tuple[Deltas, dict[str, float], dict[str, float]]:
        """One training on the edits `order` indexes (every forward fixed and replayed, see `compute_deltas`),
        from the model's weights plus `init`; the locality and swap targets are the model's own (the base's).
        Returns (change of the target weights, timings prepare / train, run statistics); the model is restored."""
        cfg = self.config
        t0 = time.perf_counter()
        device = model_device(model)
        modules = [get_module(model, n) for n in self.module_names]
        originals = [m.weight.detach().clone() for m in modules]
        flags = {p: p.requires_grad for p in model.parameters()}
        timings: dict[str, float] = {}
        was_training, grad_was = model.training, torch.is_grad_enabled()
        try:
            torch.set_grad_enabled(True)  # callers may hold no_grad (the daemon's measurements); restored below
            model.eval()  # dropout off; gradients still flow
            for p in model.parameters():
                p.requires_grad_(False)
            rng = random.Random(cfg.seed)
            order = list(order)
            rng.shuffle(order)
            parts = [list(chunk) for chunk in chunked(order, cfg.batch_size)]
            edits = [edit_pass(tokenize_requests(tokenizer, [requests[i] for i in part]).to(device)) for part in parts]
            swap_sets = [self._swap_passes(tokenizer, requests, parts, device, seed=cfg.seed + e)
                         for e in range(cfg.epochs if cfg.swap_resample and cfg.swap_weight > 0 else 1)]
            locs = []
            if cfg.locality_weight > 0 and cfg.n_locality > 0:
                locs = [prompt_pass(tokenize_prompts(tokenizer, list(chunk)).to(device))
                        for chunk in chunked(locality_prompts(cfg.n_locality, cfg.seed, self.held_out),
                                             cfg.locality_batch)]
            start = first_block(self.module_names) if replayable(model) else None
            swap_passes = [p for sw in swap_sets for p in sw if p is not None]
            start = _cache_prefix(model, start, [*edits, *swap_passes, *locs])
            with torch.no_grad():  # the base model's targets (the model is at the base weights here)
                loc_logps = [torch.log_softmax(pass_logits_NW(model, start, p), dim=-1) for p in locs]
                target_sets = [[None if p is None else top_k(model, start, p, cfg.swap_top_k) for p in sw]
                               for sw in swap_sets]
            if init is not None:  # training starts from `init`; the references above stay the base model's
                add_deltas_(model, init)
            timings["prepare"] = time.perf_counter() - t0
            params = [m.weight for m in modules]
            for p in params:
                p.requires_grad_(True)
            keep = []  # (module, base weight K×V, factor L K×R of C, 1 / tr(Wᵀ C W)) for preserve_weight
            if cfg.preserve_weight > 0:
                if not self.moments:
                    raise EngineError("preserve_weight > 0 needs the target modules' input moments; call "
                                      "set_preservation first")
                for name, module, original in zip(self.module_names, modules, originals):
                    base_KV = (original if weight_layout(module) == "in_out" else original.t()).float()
                    C_KK = self.moments[name].to(device=device, dtype=torch.float32)
                    keep.append((module, base_KV, moment_factor_KR(C_KK, cfg.preserve_rank),
                                 1.0 / float(output_change(base_KV, C_KK))))
            opt = torch.optim.Adam(params, lr=cfg.lr if init is None else cfg.warm_lr)
            visit = list(range(len(parts)))
            steps, epochs, hits = 0, 0, 0
            progress = Progress("fine-tune", cfg.epochs * len(visit) if order else 0, unit="step", logger=log)
            for epoch in range(cfg.epochs if order else 0):
                swaps, swap_targets = swap_sets[epoch % len(swap_sets)], target_sets[epoch % len(swap_sets)]
                rng.shuffle(visit)
                epochs += 1
                hits = 0
                for j in visit:
                    e = edits[j]
                    logits_NW = pass_logits_NW(model, start, e)
                    loss = answer_nll_B(logits_NW, e.targets_N, e.rows_N, e.n_rows).mean()
                    hits += int(answer_hits_B(logits_NW.detach(), e.targets_N, e.rows_N, e.n_rows).sum())
                    if locs:
                        k = steps % len(locs)
                        loss = loss + cfg.locality_weight * kl_from_base_B(
                            loc_logps[k], pass_logits_NW(model, start, locs[k]), cfg.divergence).mean()
                    if swaps[j] is not None:
                        ids_BK, logp_BK = swap_targets[j]  # type: ignore[misc]
                        loss = loss + cfg.swap_weight * topk_kl_from_base_B(
                            ids_BK, logp_BK, pass_logits_NW(model, start, swaps[j])).mean()
                    if keep:
                        loss = loss + cfg.preserve_weight * sum(
                            scale * (L_KR.T @ (module_weight_KV(module).float() - base_KV)).square().sum()
                            for module, base_KV, L_KR, scale in keep)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    steps += 1
                    progress.update()
                log_stage(log, f"fine-tune: epoch {epochs} of at most {cfg.epochs}", edits=len(order),
                          recalled=hits)
                if hits == len(order):
                    break
            progress.close()
            timings["train"] = time.perf_counter() - t0 - timings["prepare"]
            deltas = {}
            with torch.no_grad():
                for name, module, original in zip(self.module_names, modules, originals):
                    after_KV = module_weight_KV(module).detach().float().clone()
                    module.weight.copy_(original)
                    deltas[name] = LayerDelta(dense_KV=(after_KV - module_weight_KV(module).float()).cpu())
        finally:
            with torch.no_grad():
                for module, original in zip(modules, originals):
                    module.weight.copy_(original)
            for p, flag in flags.items():
                p.requires_grad_(flag)
            model.train(was_training)
            torch.set_grad_enabled(grad_was)
        run = {"epochs": epochs, "steps": steps, "train_hit": hits / len(order) if order else 1.0,
               "trained": len(order), "swaps": sum(p.n_rows for p in swap_passes), "replayed": start is not None}
        return deltas, timings, run

    def _swap_passes(self, tokenizer: PreTrainedTokenizerBase, requests: Sequence[EditRequest],
                     parts: Sequence[Sequence[int]], device, seed: int) -> list[Pass | None]:
        """Per mini-batch, the pass over its edits' subject-swapped prompts (partners drawn with `seed`; None when
        `swap_weight` is 0 or none of them has one)."""
        prompts = subject_swaps(requests, seed) if self.config.swap_weight > 0 else [None] * len(requests)
        passes: list[Pass | None] = []
        for part in parts:
            mine = [prompts[i] for i in part if prompts[i] is not None]
            passes.append(prompt_pass(tokenize_prompts(tokenizer, mine).to(device)) if mine else None)
        return passes
