"""The priors of the editor's ridge solve beyond λI: preservation μ(N)·C and protection ν·KₑᵀKₑ.

The solve of layer l minimises ‖KΔW − R̂‖² + λ‖ΔW‖² + tr(ΔWᵀ P ΔW) with the prior (`horse.solve.preserving_solve`)

    P = μ(N)·C + ν·KₑᵀKₑ,   μ(N) = max(weight / N^exponent, floor) for a batch of N edits

- C: second moments of the layer's inputs on unrelated text (`horse.covariance.preservation_moments`): the
  preservation prior keeps the layer's outputs on ordinary text. The floor keeps large batches (a consolidation
  of many nights) from losing it: one 1,000-edit batch without it multiplied the perplexity of fixed text by
  19, with μ = 1 by 4.4 (benchmarks/studies/preserve_weight.py, part 3). The hypernet was trained on batches of
  ~100 edits, where the edits share the common directions of the keys between them; a small batch (what the
  daemon's bisection edits) puts its whole residual on those directions and moves every prompt, so it needs a
  much stronger prior (benchmarks/studies/preserve_weight.py: exponent 2 keeps both regimes).
- KₑᵀKₑ: the keys of earlier edits whose outputs the solve keeps (AlphaEdit's sequential term, soft), so a new
  batch overwrites less of what earlier batches wrote.

Both are inference-time options: the hypernet was trained without them. The `Editor` holds them
(`set_preservation`, `set_protected_keys`); these functions are their arithmetic.

Dimension key: N answer tokens, K = d_k. Tests: `python -m pytest tests/horse/test_editor.py -q`.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from horse.errors import EngineError


def preserve_mu(n_edits: int, weight: float, exponent: float, floor: float) -> float:
    """μ(N) = max(weight / N^exponent, floor) for a batch of N = `n_edits` edits (N < 1 counts as 1)."""
    return max(weight / max(n_edits, 1) ** exponent, floor)


def moments_per_module(moments_KK: Mapping[str, torch.Tensor], module_names: Sequence[str], device: torch.device,
                       missing: str) -> dict[str, torch.Tensor]:
    """moments_KK of each of `module_names` (K×K), float64 on `device`.

    Raises:
        EngineError: some module has none; the message is `missing` formatted with their list.
    """
    absent = [n for n in module_names if n not in moments_KK]
    if absent:
        raise EngineError(missing.format(absent))
    return {n: moments_KK[n].to(device, torch.float64) for n in module_names}


def prior_KK(preserve_KK: torch.Tensor | None, mu: float, protect_KK: torch.Tensor | None,
             nu: float) -> torch.Tensor | None:
    """P = μ·C + ν·KₑᵀKₑ of one layer, from the terms that are on (None: neither)."""
    parts = []
    if preserve_KK is not None:
        parts.append(mu * preserve_KK)
    if protect_KK is not None:
        parts.append(nu * protect_KK)
    return sum(parts[1:], parts[0]) if parts else None


def keys_second_moments_KK(keys_NK: Mapping[str, torch.Tensor], module_names: Sequence[str],
                           device: torch.device) -> dict[str, torch.Tensor]:
    """Per module, KᵀK (K×K, float64 on `device`) of its keys_NK."""
    return {n: (k := keys_NK[n].to(device, torch.float64)).T @ k for n in module_names}
