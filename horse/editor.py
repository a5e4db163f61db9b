"""The Editor: a hypernet bound to one base model, turning edit requests into weight deltas.

Owns the editing pipeline of HORSE / MALMEN (paper steps 3–7):
    tokenise → capture K^l, G^l (hooks.py) → residuals R^l from the hypernet (hypernet.py)
    → spread R̂^l (spread.py) → ridge solve ΔW^l (solve.py, with the priors of priors.py) → `Deltas` (deltas.py)
and one edit of a whole ledger from additive statistics (sums.py). The hypernet checkpoint format
(safetensors + JSON card, no pickle) is horse/checkpoint.py: `Editor.save` and `Editor.from_checkpoint` call it,
and `read_checkpoint`, `atomic_write` and `CARD_KEY` are importable from here as before.

The editor never writes model weights: `compute_deltas` returns deltas, and applying them (with exact
restore) is `horse.deltas.apply_deltas`. The model's parameters and train/eval mode are restored after the
capture pass.

    editor = Editor.from_checkpoint("hypernet.safetensors", model)
    deltas, timings_s = editor.compute_deltas(model, tok, requests)
    with apply_deltas(model, deltas): ...

Tests: `python -m pytest tests/horse/test_editor.py tests/horse/test_checkpoint.py -q`.
"""
from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from horse import priors
from horse.arch import default_target_modules, get_module, model_device, module_shape_KV
from horse.batches import eval_mode, lm_batches, request_batches  # noqa: F401 - lm_batches re-exported
from horse.checkpoint import CARD_KEY, FORMAT_VERSION, atomic_write, read_checkpoint  # noqa: F401 - re-exported
from horse.checkpoint import hypernet_card, load_checkpoint, write_checkpoint
from horse.deltas import Deltas, LayerDelta, fingerprint_modules
from horse.errors import EngineError
from horse.hooks import Captured, capture, capture_keys
from horse.hypernet import HyperConfig, HyperNetSet, layer_residuals
from horse.solve import RidgeSolution, preserving_solve, ridge_solve
from horse.spread import spread_residuals
from horse.sums import SUMS_SPREADS, EditSums, batch_sums, solve_sums, spread_rhs
from horse.types import EditRequest


@dataclass
class Prediction:
    """One pass of the editor over a captured batch (kept by meta-training for the backward stage)."""

    captured: Captured
    stats: dict[str, tuple[torch.Tensor, torch.Tensor]]  # net key → (mean_D, std_D) used
    resids_NV: list[torch.Tensor]  # R^l, ascending
    spread_NV: list[torch.Tensor]  # R̂^l
    lams: list[torch.Tensor]  # λ_l
    solutions: list[RidgeSolution]


class Editor:
    """A HORSE / MALMEN hypernet bound to a base model (by module names, shapes and fingerprint).

    Attributes:
        config: the HyperConfig (module_names always filled in).
        nets: the hypernets (an nn.Module; meta-training optimises its parameters).
        fingerprint: sha256 of the target modules' original weights of the base model.
        update_normaliser: when True, every `compute_deltas` merges its inputs into the running
            normaliser (off by default: serving is deterministic and stateless).
        preserve_KK: per module, the second moments C of the preservation prior P = μ(N)·C of
            `preserving_solve`, μ(N) = preserve_weight / N^preserve_exponent for a batch of N edits (None:
            the plain ridge solve the hypernet was trained with); set them with `set_preservation`.
        protect_KK: per module, KₑᵀKₑ of the keys of earlier edits whose outputs the solve keeps, weighted
            by protect_weight (None: off); set them with `set_protected_keys`.
        metadata: the checkpoint card's extra fields (training data hash, steps, metrics, ...).
        from_base: read by the daemon: when True each night is one edit of every carried edit plus the
            new ones on the base weights (config `hypernet_from_base`); the editor itself ignores it.
        protects_keys, carries_normaliser: what the daemon's joint night may ask of this engine
            (`set_protected_keys`; `normaliser_state` / `load_normaliser_state`): both, for a hypernet.
        last_run: what the last `compute_deltas` reports beyond its timings (nothing, for a hypernet).
    """

    kind = "hypernet"
    protects_keys = True
    carries_normaliser = True
    last_run: dict | None = None

    def __init__(
        self, config: HyperConfig, nets: HyperNetSet, fingerprint: str, shapes_KV: Sequence[tuple[int, int]],
        metadata: dict | None = None,
    ) -> None:
        self.config = config
        self.nets = nets
        self.fingerprint = fingerprint
        self.shapes_KV = [tuple(s) for s in shapes_KV]
        self.update_normaliser = False
        self.preserve_KK: dict[str, torch.Tensor] | None = None
        self.preserve_weight, self.preserve_exponent, self.preserve_floor = 0.0, 0.0, 0.0
        self.protect_KK: dict[str, torch.Tensor] | None = None
        self.protect_weight = 0.0
        self.metadata: dict = dict(metadata or {})
        self.from_base = False

    # ------------------------------------------------------------------ construction

    @property
    def module_names(self) -> list[str]:
        return list(self.config.module_names)

    @classmethod
    def new(cls, model: nn.Module, config: HyperConfig | None = None) -> Editor:
        """An untrained editor for `model` (identity hypernet, η = eta_init, λ = exp(lamda_init)).

        Args:
            model: the base model; its target modules' weights are fingerprinted now.
            config: the settings; empty `module_names` means the model's default targets.
        """
        config = config or HyperConfig()
        names = list(config.module_names) or default_target_modules(model, config.n_last_layers)
        config = replace(config, module_names=tuple(names))
        shapes = [module_shape_KV(get_module(model, n)) for n in names]
        nets = HyperNetSet(config, names, shapes).to(model_device(model))
        return cls(config, nets, fingerprint_modules(model, names), shapes)

    def to(self, device: str | torch.device) -> Editor:
        """Move the hypernets to `device` (in place); returns self."""
        self.nets.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.nets.parameters()).device

    # ------------------------------------------------------------------ the pipeline

    def capture(
        self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, requests: Sequence[EditRequest],
        *, lm_batch_size: int = 25,
    ) -> Captured:
        """Step 3: keys and gradients of the edit prompt → new target, at the answer tokens."""
        with eval_mode(model):
            return capture(model, self.module_names, request_batches(model, tokenizer, requests, lm_batch_size))

    def capture_keys(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, requests: Sequence[EditRequest],
                     *, lm_batch_size: int = 25) -> dict[str, torch.Tensor]:
        """The keys of `capture` alone (forward passes only): keys_NK per module, at the answer tokens."""
        with eval_mode(model):
            return capture_keys(model, self.module_names, request_batches(model, tokenizer, requests, lm_batch_size))

    def normaliser_stats(self, captured: Captured, *, update: bool) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per net: merge this batch into the running normaliser when `update`, then return the stats to use."""
        stats = {}
        for key, net in self.nets.nets.items():
            rows = [
                torch.cat([captured.keys_NK[n], captured.grads_NV[n]], dim=-1)
                for n in self.module_names
                if self.nets.slots[n][0] == key
            ]
            x_ND = torch.cat(rows).to(self.device)
            if update:
                net.normaliser.update(x_ND)
            mean_D, std_D = net.normaliser.stats_for(x_ND)
            stats[key] = (mean_D.to(self.device), std_D.to(self.device))
        return stats

    def residuals(
        self, captured: Captured, stats: dict[str, tuple[torch.Tensor, torch.Tensor]], *, names: Sequence[str] | None = None
    ) -> list[torch.Tensor]:
        """Step 5: R^l per layer (autograd follows the current grad mode)."""
        out = []
        for name in names or self.module_names:
            net, layer = self.nets.net_for(name)
            key = self.nets.slots[name][0]
            out.append(
                layer_residuals(
                    net, layer, captured.keys_NK[name].to(self.device), captured.grads_NV[name].to(self.device),
                    stats[key], self.config.chunk_tokens,
                )
            )
        return out

    def lams(self) -> list[torch.Tensor]:
        """λ_l per layer, ascending (detached)."""
        out = []
        for name in self.module_names:
            net, layer = self.nets.net_for(name)
            out.append(net.lam(layer).detach())
        return out

    def normaliser_state(self) -> dict[str, torch.Tensor]:
        """The input normalisers' running statistics (count, mean_D, m2_D per net), CPU float64 copies."""
        return {k: v.detach().cpu().clone() for k, v in self.nets.state_dict().items() if ".normaliser." in k}

    def load_normaliser_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Put statistics from `normaliser_state` back (a later night continues from an earlier one's).

        Raises:
            EngineError: the state belongs to another hypernet (other nets or widths).
        """
        own = {k: v for k, v in self.nets.state_dict().items() if ".normaliser." in k}
        if set(state) != set(own) or any(tuple(state[k].shape) != tuple(v.shape) for k, v in own.items()):
            raise EngineError("the saved normaliser statistics do not fit this hypernet (other nets or widths); "
                              "they were written with another hypernet — remove them or configure that hypernet")
        with torch.no_grad():
            for k, v in own.items():
                v.copy_(state[k].to(v.device, v.dtype))

    def set_preservation(self, second_moments_KK: Mapping[str, torch.Tensor] | None, weight: float,
                         exponent: float = 0.0, floor: float = 0.0) -> Editor:
        """Serve with the preservation prior μ(N) · C_l on every edited layer (`preserving_solve`).

        μ(N) = max(weight / N^exponent, floor) for a batch of N edits; why the floor and the exponent, see
        horse/priors.py (a small batch needs a much stronger prior than the ~100 edits the hypernet was trained
        on, a consolidation of many nights must not lose it).

        Args:
            second_moments_KK: per module name, C (K×K) of its inputs on unrelated text, e.g. from
                `horse.covariance.preservation_moments`; None (or weight 0) restores the plain solve.
            weight: μ(1) ≥ 0.
            exponent: how fast μ falls with the batch size (0: the same μ for every batch).
            floor: the least μ for any batch size (≥ 0).

        Returns:
            self.
        """
        if weight < 0 or exponent < 0 or floor < 0:
            raise EngineError(f"preservation weight, exponent and floor must be ≥ 0, got {weight}, {exponent}, {floor}")
        if second_moments_KK is None or weight == 0:
            self.preserve_KK, self.preserve_weight, self.preserve_exponent, self.preserve_floor = None, 0.0, 0.0, 0.0
            return self
        self.preserve_KK = priors.moments_per_module(second_moments_KK, self.module_names, self.device,
                                                     "no second moments for {}; estimate them for every edited module")
        self.preserve_weight, self.preserve_exponent = float(weight), float(exponent)
        self.preserve_floor = min(float(floor), self.preserve_weight)
        return self

    def set_protected_keys(self, keys_KK: Mapping[str, torch.Tensor] | None, weight: float) -> Editor:
        """Serve with a prior ν·KₑᵀKₑ that keeps the layers' outputs on earlier edits' keys (AlphaEdit's
        sequential term, soft): the solve minimises ‖KΔW − R̂‖² + ν‖KₑΔW‖² (+ the ridge and preservation
        terms), so a new batch overwrites less of what earlier batches wrote. An inference-time option, like
        the preservation prior: the hypernet was trained without it.

        Args:
            keys_KK: per module name, the sum of kᵀk over the earlier edits' keys (K×K, e.g. summed from
                `keys_second_moments` of each applied batch); None (or weight 0) turns it off.
            weight: ν ≥ 0.

        Returns:
            self.
        """
        if weight < 0:
            raise EngineError(f"the protection weight must be ≥ 0, got {weight}")
        if keys_KK is None or weight == 0:
            self.protect_KK, self.protect_weight = None, 0.0
            return self
        self.protect_KK = priors.moments_per_module(keys_KK, self.module_names, self.device,
                                                    "no key moments for {}; sum them for every edited module")
        self.protect_weight = float(weight)
        return self

    def keys_second_moments(self, captured: Captured | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per module, KᵀK (K×K, float64) of a batch's captured keys (a Captured, or keys_NK per module): what
        `set_protected_keys` sums."""
        keys = captured.keys_NK if isinstance(captured, Captured) else captured
        return priors.keys_second_moments_KK(keys, self.module_names, self.device)

    def requests_second_moments(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase,
                                requests: Sequence[EditRequest], *, chunk_edits: int = 100) -> dict[str, torch.Tensor]:
        """Per module, KᵀK (K×K, float64) of `requests`' keys on `model`, captured `chunk_edits` at a time: the
        argument of `set_protected_keys` for edits the model already carries."""
        total: dict[str, torch.Tensor] | None = None
        for start in range(0, len(requests), chunk_edits):
            moments = self.keys_second_moments(self.capture_keys(model, tokenizer, requests[start:start + chunk_edits]))
            total = moments if total is None else {n: total[n] + moments[n] for n in total}
        if total is None:
            raise EngineError("no requests to take key moments of; give at least one EditRequest")
        return total

    def prior_KK(self, name: str, n_edits: int) -> torch.Tensor | None:
        """The solve's prior P for module `name` and a batch of N edits: μ(N)·C + ν·KₑᵀKₑ (None: neither)."""
        preserve_KK = None if self.preserve_KK is None else self.preserve_KK[name]
        protect_KK = None if self.protect_KK is None else self.protect_KK[name]
        return priors.prior_KK(preserve_KK, self.preserve_mu(n_edits), protect_KK, self.protect_weight)

    def preserve_mu(self, n_edits: int) -> float:
        """μ(N) of the preservation prior for a batch of N edits (0 when the prior is off)."""
        if self.preserve_KK is None:
            return 0.0
        return priors.preserve_mu(n_edits, self.preserve_weight, self.preserve_exponent, self.preserve_floor)

    def predict(self, captured: Captured, *, update_normaliser: bool | None = None,
                timings_s: dict[str, float] | None = None, n_edits: int = 1) -> Prediction:
        """Steps 4–7 without gradients: residuals, spread, ridge solve per layer."""
        timings_s = {} if timings_s is None else timings_s
        update = self.update_normaliser if update_normaliser is None else update_normaliser
        t0 = time.perf_counter()
        with torch.no_grad():
            stats = self.normaliser_stats(captured, update=update)
            resids = self.residuals(captured, stats)
            _sync(self.device)
            t1 = time.perf_counter()
            grads = [captured.grads_NV[n].to(self.device) for n in self.module_names]
            spread = spread_residuals(resids, grads, self.config.spread)
            _sync(self.device)
            t2 = time.perf_counter()
            lams = self.lams()
            solutions = []
            for n, r, lam in zip(self.module_names, spread, lams):
                prior = self.prior_KK(n, n_edits)
                keys = captured.keys_NK[n].to(self.device)
                solutions.append(ridge_solve(keys, r, lam) if prior is None else preserving_solve(keys, r, lam, prior))
            _sync(self.device)
            t3 = time.perf_counter()
        timings_s.update(hypernet=t1 - t0, spread=t2 - t1, solve=t3 - t2)
        return Prediction(captured, stats, resids, spread, lams, solutions)

    def compute_deltas(
        self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, requests: Sequence[EditRequest],
        *, lm_batch_size: int = 25,
    ) -> tuple[Deltas, dict[str, float]]:
        """Weight deltas that write `requests` into `model` (the model itself is not changed).

        Args:
            model: the base model the editor was built for (fp32 or bf16, any device).
            tokenizer: its tokenizer.
            requests: the facts to edit, at least one.
            lm_batch_size: requests per LM mini-batch of the capture pass.

        Returns:
            (deltas keyed by module path, fp32 K×V dense or factored; timings in seconds by stage:
            capture, hypernet, spread, solve, total).

        Raises:
            EngineError: for no requests, empty prompts or targets.
        """
        timings_s: dict[str, float] = {}
        t0 = time.perf_counter()
        captured = self.capture(model, tokenizer, requests, lm_batch_size=lm_batch_size)
        _sync(model_device(model))
        timings_s["capture"] = time.perf_counter() - t0
        prediction = self.predict(captured, timings_s=timings_s, n_edits=len(requests))
        deltas = solutions_to_deltas(self.module_names, prediction.solutions)
        timings_s["total"] = time.perf_counter() - t0
        return deltas, timings_s

    # ------------------------------------------------------------------ one edit of a whole ledger, from sums

    @property
    def sums_supported(self) -> bool:
        """Whether `edit_sums` / `deltas_from_sums` reproduce `compute_deltas` of the union: the spread's
        coefficients are sums over tokens and the normaliser is frozen, so each residual row is its token's own."""
        return (self.config.spread in SUMS_SPREADS and not self.update_normaliser
                and all(net.normaliser.has_stats for net in self.nets.nets.values()))

    def edit_sums(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, requests: Sequence[EditRequest],
                  *, chunk_edits: int = 200, lm_batch_size: int = 25) -> EditSums:
        """The additive statistics (`horse.sums`) of `requests` on `model`, captured about `chunk_edits` at a
        time in LM mini-batches of `lm_batch_size` (each gradient is of its mini-batch's mean CE, so the sums of
        sets equal the statistics of their union captured in the same mini-batches); `deltas_from_sums` solves
        them.

        Raises:
            EngineError: no requests, or an editor whose residuals depend on the batch (`sums_supported`).
        """
        if not self.sums_supported:
            raise EngineError(f"spread {self.config.spread!r} or a running normaliser makes residuals depend on "
                              f"the batch; edit sums need one of {', '.join(SUMS_SPREADS)} and frozen statistics")
        chunk = max(lm_batch_size, chunk_edits - chunk_edits % lm_batch_size)  # whole LM mini-batches
        total: EditSums | None = None
        for start in range(0, len(requests), chunk):
            part = requests[start:start + chunk]
            captured = self.capture(model, tokenizer, part, lm_batch_size=lm_batch_size)
            with torch.no_grad():
                resids = self.residuals(captured, self.normaliser_stats(captured, update=False))
                sums = batch_sums([captured.keys_NK[n].to(self.device) for n in self.module_names], resids,
                                  [captured.grads_NV[n].to(self.device) for n in self.module_names], len(part))
            total = sums if total is None else total + sums
        if total is None:
            raise EngineError("no requests to edit; give at least one EditRequest")
        return total

    def deltas_from_sums(self, sums: EditSums) -> Deltas:
        """Dense fp32 deltas (CPU) of the edits behind `sums`: the spread and the ridge solve with this editor's
        λ and prior (preservation μ(N) for N = sums.n_edits, protection) — `compute_deltas` of their union."""
        rhs = spread_rhs(sums, self.config.spread)
        deltas: Deltas = {}
        for name, kk, r, lam in zip(self.module_names, sums.kk_KK, rhs, self.lams()):
            kk = kk.to(self.device)
            delta_KV = solve_sums(kk, r.to(self.device), lam, self.prior_KK(name, sums.n_edits))
            deltas[name] = LayerDelta(dense_KV=delta_KV.float().cpu())
        return deltas

    # ------------------------------------------------------------------ checkpoints (horse/checkpoint.py)

    def card(self, extra_metadata: dict | None = None) -> dict:
        """The JSON card saved with the checkpoint (`horse.checkpoint.hypernet_card`)."""
        return hypernet_card(self.config, self.nets, self.shapes_KV, self.fingerprint, self.metadata, extra_metadata)

    def save(self, path: str | os.PathLike, *, extra_metadata: dict | None = None,
             dtype: torch.dtype | None = None) -> Path:
        """Write the hypernet (safetensors, atomic) and its card (`<path>.json`).

        Args:
            path: the .safetensors file.
            extra_metadata: JSON-safe fields added to the card (training data hash, steps, metrics).
            dtype: store floating parameters in this dtype (e.g. torch.bfloat16 to ship); normaliser
                buffers always stay float64.

        Returns:
            the path written.
        """
        return write_checkpoint(path, self.nets, self.card(extra_metadata), dtype=dtype)

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, model: nn.Module, *, force: bool = False) -> Editor:
        """Load a hypernet for `model`.

        Raises:
            BadCheckpoint: the file is not a readable horse hypernet.
            CheckpointMismatch: the module names or shapes do not exist in `model`, or (unless `force`)
                the base-model fingerprint differs.
        """
        config, nets, fingerprint, shapes, metadata = load_checkpoint(path, model, force=force)
        return cls(config, nets.to(model_device(model)), fingerprint, shapes, metadata)


def solutions_to_deltas(module_names: Sequence[str], solutions: Sequence[RidgeSolution]) -> Deltas:
    """RidgeSolution per module → fp32 LayerDelta per module (factored when that is smaller)."""
    deltas: Deltas = {}
    for name, sol in zip(module_names, solutions):
        if sol.is_factored:
            assert sol.keys_NK is not None and sol.coef_NV is not None
            deltas[name] = LayerDelta(keys_NK=sol.keys_NK.float(), coef_NV=sol.coef_NV.float())
        else:
            deltas[name] = LayerDelta(dense_KV=sol.to_dense().float())
    return deltas


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
