"""Additive sufficient statistics of a hypernet edit: one edit of a whole ledger without re-capturing it.

For an edited layer l with keys K (N×K), residuals R^l (N×V) and the previous layer's residuals R^{l−1} and
captured output gradients G^{l−1} (N×V, the same N answer tokens), the sums over answer tokens

    KK^l = KᵀK (K×K),  KR^l = KᵀR^l (K×V),  KG^l = KᵀG^{l−1} (K×V),  rr^l = ⟨R^l, R^{l−1}⟩_F,  pp^l = ‖R^{l−1}‖²_F

are all the ridge solve and the "reference" (or "none") spread need, because every residual row depends on its
own token only (the hypernet normalises with its frozen training-time statistics):

    c^l = rr^l / pp^l,   KᵀR̂^l = KR^l − c^l · KG^l,   ΔW^l = (KK^l + λ_l I + P^l)⁻¹ KᵀR̂^l

So the statistics of a union of edit sets are the sums of theirs, and a set minus a subset is the difference.
The daemon keeps them beside the head (`hypernet_from_base`): a night adds its own edits' statistics instead of
re-capturing every edit the head carries, and the solve is one K×K system per layer, whatever the ledger's size.
The result equals `Editor.compute_deltas` on all the edits in one batch, up to rounding (float64 here).

Dimension key: N answer tokens, K = d_k, V = d_v, L edited layers (ascending depth). Pure tensor functions.
Tests: `python -m pytest tests/horse/test_sums.py -q`.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from horse.errors import EngineError

SUMS_SPREADS = ("reference", "none")  # the spreads whose coefficients are sums over tokens


@dataclass(frozen=True)
class EditSums:
    """The statistics of a set of edits (see the module docstring), per edited layer, float64.

    Attributes:
        n_edits: how many edits (the preservation prior's μ(N) reads it).
        n_tokens: how many answer tokens (rows of K) they have.
        kk_KK, kr_KV, kg_KV: per layer KᵀK, KᵀR^l, KᵀG^{l−1} (layer 0's kg is zeros).
        rr_L, pp_L: ⟨R^l, R^{l−1}⟩ and ‖R^{l−1}‖² per layer (0 for layer 0).
    """

    n_edits: int
    n_tokens: int
    kk_KK: tuple[torch.Tensor, ...]
    kr_KV: tuple[torch.Tensor, ...]
    kg_KV: tuple[torch.Tensor, ...]
    rr_L: torch.Tensor
    pp_L: torch.Tensor

    def _combine(self, other: EditSums, sign: float) -> EditSums:
        if len(self.kk_KK) != len(other.kk_KK) or any(a.shape != b.shape for a, b in zip(self.kr_KV, other.kr_KV)):
            raise EngineError("the two sets of edit statistics belong to different editors (layers or shapes differ)")
        def add(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # on a's device (a cached set is on the CPU)
            return a + sign * b.to(a.device)

        return EditSums(
            self.n_edits + int(sign) * other.n_edits, self.n_tokens + int(sign) * other.n_tokens,
            tuple(map(add, self.kk_KK, other.kk_KK)), tuple(map(add, self.kr_KV, other.kr_KV)),
            tuple(map(add, self.kg_KV, other.kg_KV)), add(self.rr_L, other.rr_L), add(self.pp_L, other.pp_L))

    def __add__(self, other: EditSums) -> EditSums:
        return self._combine(other, 1.0)

    def __sub__(self, other: EditSums) -> EditSums:
        return self._combine(other, -1.0)

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """Flat name → tensor (for safetensors); `from_tensors` inverts it."""
        out = {"n_edits": torch.tensor([self.n_edits, self.n_tokens], dtype=torch.int64), "rr_L": self.rr_L,
               "pp_L": self.pp_L}
        for i, (kk, kr, kg) in enumerate(zip(self.kk_KK, self.kr_KV, self.kg_KV)):
            out.update({f"kk.{i}": kk, f"kr.{i}": kr, f"kg.{i}": kg})
        return {k: v.detach().cpu().contiguous() for k, v in out.items()}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> EditSums:
        n_layers = len([k for k in tensors if k.startswith("kk.")])
        try:
            return cls(int(tensors["n_edits"][0]), int(tensors["n_edits"][1]), *(tuple(tensors[f"{p}.{i}"].double() for i in range(n_layers))
                                                      for p in ("kk", "kr", "kg")),
                       tensors["rr_L"].double(), tensors["pp_L"].double())
        except (KeyError, IndexError) as exc:
            raise EngineError(f"edit statistics without {exc}; the file is not one of horse-ledger's") from exc


def batch_sums(keys_NK: Sequence[torch.Tensor], resids_NV: Sequence[torch.Tensor], grads_NV: Sequence[torch.Tensor],
               n_edits: int) -> EditSums:
    """The statistics of one captured batch: keys K^l, residuals R^l (before the spread) and output gradients
    G^l per layer, ascending, each with the same N rows."""
    if not (len(keys_NK) == len(resids_NV) == len(grads_NV)) or not keys_NK:
        raise EngineError("batch_sums needs keys, residuals and gradients for the same layers")
    k64 = [k.detach().double() for k in keys_NK]
    r64 = [r.detach().double() for r in resids_NV]
    g64 = [g.detach().double() for g in grads_NV]
    kg, rr, pp = [torch.zeros_like(k64[0].T @ r64[0])], [0.0], [0.0]
    for layer in range(1, len(k64)):
        same = r64[layer].shape == r64[layer - 1].shape
        kg.append(k64[layer].T @ g64[layer - 1] if same else torch.zeros_like(k64[layer].T @ r64[layer]))
        rr.append(float((r64[layer] * r64[layer - 1]).sum()) if same else 0.0)
        pp.append(float((r64[layer - 1] ** 2).sum()) if same else 0.0)
    return EditSums(n_edits, k64[0].shape[0], tuple(k.T @ k for k in k64), tuple(k.T @ r for k, r in zip(k64, r64)), tuple(kg),
                    torch.tensor(rr, dtype=torch.float64), torch.tensor(pp, dtype=torch.float64))


def spread_rhs(sums: EditSums, option: str) -> list[torch.Tensor]:
    """KᵀR̂^l (K×V) per layer for the "reference" or "none" spread (see `horse.spread`)."""
    if option not in SUMS_SPREADS:
        raise EngineError(f"spread {option!r} has no additive statistics; use one of {', '.join(SUMS_SPREADS)}")
    out = [sums.kr_KV[0]]
    for layer in range(1, len(sums.kr_KV)):
        if option == "none":
            out.append(sums.kr_KV[layer])
            continue
        coef = sums.rr_L[layer] / sums.pp_L[layer].clamp_min(torch.finfo(torch.float64).tiny)
        out.append(sums.kr_KV[layer] - coef * sums.kg_KV[layer])
    return out


def solve_sums(kk_KK: torch.Tensor, rhs_KV: torch.Tensor, lam: float | torch.Tensor,
               prior_KK: torch.Tensor | None = None) -> torch.Tensor:
    """ΔW (K×V) = (KᵀK + λI + P)⁻¹ KᵀR̂ in float64: the primal ridge (or preserving) solve from statistics."""
    system = kk_KK.double() + torch.as_tensor(lam, dtype=torch.float64, device=kk_KK.device) * torch.eye(
        kk_KK.shape[0], dtype=torch.float64, device=kk_KK.device)
    if prior_KK is not None:
        system = system + prior_KK.to(system)
    return torch.linalg.solve(system, rhs_KV.double())
