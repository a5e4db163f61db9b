"""MEMIT (Meng et al. 2023, "Mass-Editing Memory in a Transformer"), the baseline of issue 5, as its reference
code (kmeng01/memit) runs it.

Owns the method on the engine's plumbing: the batch closed form spread over the edited layers and
`memit_deltas`, which returns `horse.deltas.Deltas` like `Editor.compute_deltas` does, so the eval command, the
benchmark and the daemon use either method interchangeably; `MemitEditor` puts it behind the daemon's editor
interface. The parts live beside it: `horse.memit_config` (`MemitConfig`, the hyper-parameters per
architecture), `horse.memit_templates` (the sampled context templates), `horse.memit_z` (step 1),
`horse.memit_rows` (token layout), `horse.covariance` (the statistics C). Their public names import from here.

Algorithm (paper Alg. 1; equation numbers are the paper's):
1. z_i = h_i^L + δ_i for every fact i at the last edited layer L (eq. 16; `horse.memit_z.compute_z_BV`).
2. For each edited layer l, first to last (eq. 9–14): keys K (module input at the subject's last token,
   averaged over the context templates as `compute_ks` does) and the current h^L are recomputed on the
   model with the earlier layers already edited; R = (Z − H^L) / (L − l) spreads the remaining residual
   over the layers left (eq. 20); ΔW = R Kᵀ (λ C + K Kᵀ)⁻¹ (eq. 14).
3. The edit is applied layer by layer while computing (step 2 needs it) and removed at the end: the model
   is always restored bit-exactly (`horse.deltas.apply_deltas`).

The covariance regularisation (eq. 14), checked against the reference's `execute_memit`: it solves
adj_k = (λ C + K Kᵀ)⁻¹ K with K the keys as columns and returns ΔW = R adj_kᵀ, where λ = `mom2_update_weight`
(15000 for GPT-J and SmolLM2, 20000 for GPT-2 XL) and C = `layer_stats(..., to_collect=["mom2"])`, the
uncentred second moment E[k kᵀ] of the edited module's input over every token of its corpus. Here the same:
in this engine's K×V orientation delta_KV = (λ C_KK + K_NKᵀ K_NK)⁻¹ K_NKᵀ R_NV, returned factored as
(adj_NK, R_NV) with adj_NK = K_NK (λ C_KK + K_NKᵀ K_NK)⁻¹ (C symmetric), solved in float64; C is the uncentred
second moment of the same module input (`horse.covariance`). Two differences, both in C's estimate: the corpus
is local training-split text, N = `cov_tokens_per_dim` × d_k tokens (30 720 for SmolLM2-135M) instead of 100k
Wikipedia samples, and C is shrunk towards a scaled identity by α = `cov_shrinkage` (1 %) to stay well
conditioned at that N (`shrink_KK`; α = 0 is the reference's unshrunk C). The reference also keeps the base
model's C for every later batch (cached by model name); here it is keyed by the base model's fingerprint.

Dimension key: B facts, S sequences (B × templates), N = B keys, K = d_k, V = d_v (= hidden width for an MLP
output module).

    deltas, info = memit_deltas(model, tok, requests, MemitConfig.for_model(model), cache_dir=cache)

Run the tests with `pytest tests/horse/test_memit.py tests/horse/test_memit_templates.py
tests/horse/test_memit_config.py`; the SmolLM2 layer sweep with `python benchmarks/studies/memit_layers.py`.
"""
from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Sequence
from dataclasses import replace

import torch
from torch import nn

from horse.arch import get_module, module_shape_KV
from horse.covariance import layer_second_moments, model_fingerprint, shrink_KK
from horse.deltas import Deltas, LayerDelta, apply_deltas, fingerprint_modules
from horse.errors import EngineError, NonFiniteDelta
from horse.memit_config import (
    MEMIT_HPARAMS,
    SMOLLM2_135M_LAYERS,
    ArchHparams,
    MemitConfig,
    arch_hparams,
    arch_key,
    default_layers,
)
from horse.memit_rows import MissingSubject, StopForward, build_rows, hooks
from horse.memit_templates import TemplatesNotCached, context_templates
from horse.memit_z import clamp_rows_BV, compute_z_BV
from horse.replay import block_path, first
from horse.types import EditRequest

__all__ = [
    "MEMIT_HPARAMS", "SMOLLM2_135M_LAYERS", "ArchHparams", "MemitConfig", "MemitEditor", "MissingSubject",
    "TemplatesNotCached", "arch_hparams", "arch_key", "clamp_rows_BV", "compute_z_BV", "context_templates",
    "default_layers", "keys_and_current_z", "memit_adjusted_keys_NK", "memit_delta_KV", "memit_deltas",
    "spread_residual_NV",
]


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
    templates = config.templates()
    per_group = max(1, config.lm_batch_size // len(templates))
    keys_parts, cur_parts = [], []
    for start in range(0, len(requests), per_group):
        chunk = requests[start:start + per_group]
        rows = build_rows(tok, chunk, templates, None, with_answers=False).to(device)
        seq_idx = torch.arange(rows.input_ids.shape[0], device=device)
        got: dict[str, torch.Tensor] = {}

        def grab_key(mod, args):
            got["k"] = args[0][seq_idx, rows.lookup_S].float()

        def grab_z(mod, args, out):
            got["z"] = first(out)[seq_idx, rows.lookup_S].float()
            raise StopForward

        with hooks([(module, "pre", grab_key), (z_block, "fwd", grab_z)]):
            try:
                model(input_ids=rows.input_ids, attention_mask=rows.attention_mask, use_cache=False)
            except StopForward:
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
    templates = config.templates()
    if not templates or templates[0] != "{}":
        raise EngineError(f"the first context template must be '{{}}', got {list(templates[:1])}")
    for t in templates:
        if t.count("{}") != 1 or "{" in t.replace("{}", "") or "}" in t.replace("{}", ""):
            raise EngineError(f"context template {t!r} must hold one '{{}}' (the prompt) and no other brace")
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
        config: MEMIT settings (None: `MemitConfig.for_model(model)`); `context_templates` None → the base
            model's sampled templates (`horse.memit_templates.context_templates`).
        cache_dir: where the covariance statistics and the context templates are cached
            (`<cache_dir>/memit-cov/`, `<cache_dir>/memit-templates/`).
        fingerprint: the base model's fingerprint, the key of both caches (None: sha256 of the current
            weights). Pass it when editing an already edited model to reuse the base's statistics and
            templates, as MEMIT does; what is not cached yet is then computed only on that base.

    Returns:
        (deltas, info): one factored `LayerDelta` per edited layer (delta_KV = adj_NKᵀ R_NV), and
        timings in seconds (`covariance`, `z`, `keys`, `solve`, `total`) plus the covariance corpus, N,
        shrinkage, the context templates and z-optimisation statistics.

    Raises:
        MissingSubject: a request without a subject in its prompt.
        CovarianceNotCached, TemplatesNotCached: a cache is missing and `model` is not the base `fingerprint` names.
        NonFiniteDelta: the solve produced NaN / Inf (nothing is applied).
    """
    config = config if config is not None else MemitConfig.for_model(model)
    if not config.layers:
        config = replace(config, layers=default_layers(model))
    templates_info: dict[str, object] = {}
    if config.context_templates is None:
        templates, where = context_templates(model, tok, cache_dir=cache_dir, fingerprint=fingerprint)
        config = replace(config, context_templates=templates)
        templates_info = where.as_dict()
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
                                                "cov_shrinkage": config.cov_shrinkage, **templates_info,
                                                "context_templates": list(config.templates()),
                                                "layers": layers, "n_requests": float(len(requests)),
                                                "z_residual_norm_first": resid_norms[0],
                                                "z_residual_norm_last": resid_norms[-1]}
    return deltas, info


class MemitEditor:
    """MEMIT behind the editor interface the daemon uses (`module_names`, `fingerprint`, `compute_deltas`).

    Built on the unedited base model: its covariance statistics and context templates are keyed by the base's
    fingerprint, so editing an already edited head reuses them (as MEMIT does). They are computed on the base:
    give `tokenizer` (or call `warm_caches(base, tok)`) while the model is still the base; a head edited before
    they are cached is refused (`CovarianceNotCached`, `TemplatesNotCached`) rather than measured and stored
    under the base's key. Once warmed, `config.context_templates` holds the templates (and `card` shows them).
    """

    from_base = False
    kind = "memit"
    sums_supported = protects_keys = carries_normaliser = False  # see daemon.engines.JointEngine

    def __init__(self, model: nn.Module, *, cache_dir: str | os.PathLike[str], config: MemitConfig | None = None,
                 tokenizer=None) -> None:
        self.config = config if config is not None else MemitConfig.for_model(model)
        self.cache_dir = cache_dir
        self.fingerprint = fingerprint_modules(model, self.module_names)
        self.base_fingerprint = model_fingerprint(model)
        self.last_run: dict[str, object] = {}
        if tokenizer is not None:
            self.warm_caches(model, tokenizer)

    def warm_caches(self, base: nn.Module, tok) -> None:
        """Compute and cache the covariance statistics and sample the context templates on `base` (the unedited
        model this editor was built on); the templates go into `config`."""
        d_k = max(module_shape_KV(get_module(base, name))[0] for name in self.module_names)
        layer_second_moments(base, tok, self.module_names, cache_dir=self.cache_dir,
                             n_tokens=self.config.cov_tokens_per_dim * d_k, fingerprint=self.base_fingerprint)
        if self.config.context_templates is None:
            templates, _ = context_templates(base, tok, cache_dir=self.cache_dir, fingerprint=self.base_fingerprint)
            self.config = replace(self.config, context_templates=templates)

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
