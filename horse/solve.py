"""Closed-form ridge solve of HORSE / MALMEN (paper step 7) and its adjoint for meta-training.

Owns the pure tensor math that turns one layer's keys and (spread) residuals into a weight change:

    ΔW = (KᵀK + λI)⁻¹ Kᵀ R̂        primal: a K×K system
       = Kᵀ (KKᵀ + λI)⁻¹ R̂        dual:   an N×N system (push-through identity)

and, for serving only, the same solve with a preservation prior P (`preserving_solve`, λI → λI + P),

and the reverse-mode rule used by the two-stage meta-gradient (MALMEN §4.2):

    ∂L/∂R̂ = K (KᵀK + λI)⁻¹ Γ = (KKᵀ + λI)⁻¹ K Γ,      Γ = ∂L/∂ΔW
    ∂L/∂λ  = −⟨(KᵀK + λI)⁻¹ Γ, ΔW⟩ = −⟨∂L/∂R̂, C⟩,       C = (KKᵀ + λI)⁻¹ R̂

Dimension key: N answer tokens, K = d_k (module input width), V = d_v (module output width).
Tensors are computed in at least float32 (float64 inputs stay float64). No hooks, files or globals.
Tests: `python -m pytest tests/horse/test_solve.py -q`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

Form = Literal["auto", "primal", "dual"]


def math_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """At least float32: bf16/fp16 inputs are promoted, float64 stays float64."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def choose_form(n_tokens: int, d_k: int) -> Literal["primal", "dual"]:
    """The cheaper system: primal solves K×K, dual solves N×N."""
    return "primal" if d_k <= n_tokens else "dual"


def _lam_tensor(lam: float | torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.as_tensor(lam, dtype=dtype, device=device).reshape(())


def _ridge_system(mat_XX: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    eye = torch.eye(mat_XX.shape[0], dtype=mat_XX.dtype, device=mat_XX.device)
    return mat_XX + lam * eye


@dataclass(frozen=True)
class RidgeSolution:
    """A ridge solve in whichever form was cheaper.

    Exactly one of `dense_KV` or (`keys_NK`, `coef_NV`) is set; the delta is dense_KV or keys_NKᵀ @ coef_NV.
    """

    form: Literal["primal", "dual"]
    dense_KV: torch.Tensor | None = None
    keys_NK: torch.Tensor | None = None
    coef_NV: torch.Tensor | None = None

    def to_dense(self) -> torch.Tensor:
        """ΔW as a K×V matrix."""
        if self.dense_KV is not None:
            return self.dense_KV
        assert self.keys_NK is not None and self.coef_NV is not None
        return self.keys_NK.T @ self.coef_NV

    @property
    def is_factored(self) -> bool:
        return self.dense_KV is None


def ridge_solve(
    keys_NK: torch.Tensor,
    resid_NV: torch.Tensor,
    lam: float | torch.Tensor,
    *,
    form: Form = "auto",
    allow_factored: bool = True,
) -> RidgeSolution:
    """Solve ΔW = argmin ‖KΔW − R̂‖² + λ‖ΔW‖² (paper step 7), in the cheaper form.

    Args:
        keys_NK: keys K (N×K), the module inputs at the answer tokens.
        resid_NV: spread residuals R̂ (N×V).
        lam: the ridge weight λ > 0 (a float or a 0-d tensor).
        form: "primal" (K×K system), "dual" (N×N system) or "auto" (the smaller system).
        allow_factored: return (Kᵀ, C) instead of a dense K×V matrix when N·(K+V) < K·V (dual form only).

    Returns:
        a RidgeSolution; the primal form is always dense, the dual form is factored when smaller.
    """
    n, d_k = keys_NK.shape
    d_v = resid_NV.shape[1]
    assert resid_NV.shape[0] == n, f"keys have {n} rows, residuals {resid_NV.shape[0]}"
    dtype = math_dtype(keys_NK, resid_NV)
    keys_NK = keys_NK.to(dtype)
    resid_NV = resid_NV.to(dtype)
    lam_t = _lam_tensor(lam, dtype, keys_NK.device)
    chosen = choose_form(n, d_k) if form == "auto" else form
    if chosen == "primal":
        system_KK = _ridge_system(keys_NK.T @ keys_NK, lam_t)
        dense_KV = torch.linalg.solve(system_KK, keys_NK.T @ resid_NV)
        return RidgeSolution("primal", dense_KV=dense_KV)
    system_NN = _ridge_system(keys_NK @ keys_NK.T, lam_t)
    coef_NV = torch.linalg.solve(system_NN, resid_NV)
    if allow_factored and n * (d_k + d_v) < d_k * d_v:
        return RidgeSolution("dual", keys_NK=keys_NK, coef_NV=coef_NV)
    return RidgeSolution("dual", dense_KV=keys_NK.T @ coef_NV)


def preserving_solve(
    keys_NK: torch.Tensor,
    resid_NV: torch.Tensor,
    lam: float | torch.Tensor,
    prior_KK: torch.Tensor,
    *,
    allow_factored: bool = True,
) -> RidgeSolution:
    """The ridge solve with a preservation prior P: ΔW = argmin ‖KΔW − R̂‖² + λ‖ΔW‖² + tr(ΔWᵀ P ΔW).

        ΔW = (KᵀK + A)⁻¹ Kᵀ R̂ = A⁻¹Kᵀ (I + K A⁻¹ Kᵀ)⁻¹ R̂,      A = λI + P

    With P = μ·C, C the uncentred second moment of the layer's inputs on unrelated text, the edit changes
    the layer's output on such inputs less (MEMIT's (λC + KKᵀ) term added to the MALMEN / HORSE solve). An
    inference-time option: the hypernet was meta-trained with P = 0 (`ridge_solve`), and there is no adjoint.
    Solved in float64 (A is K×K, once per layer and edit).

    Args:
        keys_NK: keys K (N×K).
        resid_NV: spread residuals R̂ (N×V).
        lam: the ridge weight λ > 0.
        prior_KK: P (K×K, symmetric positive semi-definite).
        allow_factored: return (K A⁻¹, (I + K A⁻¹ Kᵀ)⁻¹ R̂) instead of a dense K×V matrix when smaller.

    Returns:
        a RidgeSolution of form "dual" (factored when N·(K+V) < K·V), in the inputs' math dtype.
    """
    n, d_k = keys_NK.shape
    d_v = resid_NV.shape[1]
    assert resid_NV.shape[0] == n and prior_KK.shape == (d_k, d_k), "keys, residuals and prior do not match"
    out_dtype = math_dtype(keys_NK, resid_NV)
    k64, r64 = keys_NK.double(), resid_NV.double()
    system_KK = _ridge_system(prior_KK.to(k64), _lam_tensor(lam, torch.float64, k64.device))
    chol_KK = torch.linalg.cholesky(system_KK)
    adj_KN = torch.cholesky_solve(k64.T, chol_KK)  # A⁻¹Kᵀ
    inner_NN = _ridge_system(k64 @ adj_KN, torch.ones((), dtype=torch.float64, device=k64.device))
    coef_NV = torch.linalg.solve(inner_NN, r64)
    if allow_factored and n * (d_k + d_v) < d_k * d_v:
        return RidgeSolution("dual", keys_NK=adj_KN.T.to(out_dtype), coef_NV=coef_NV.to(out_dtype))
    return RidgeSolution("dual", dense_KV=(adj_KN @ coef_NV).to(out_dtype))


def ridge_delta(
    keys_NK: torch.Tensor, resid_NV: torch.Tensor, lam: float | torch.Tensor, *, form: Form = "auto"
) -> torch.Tensor:
    """ΔW (K×V) = (KᵀK + λI)⁻¹ Kᵀ R̂, dense. See `ridge_solve` for the arguments."""
    return ridge_solve(keys_NK, resid_NV, lam, form=form, allow_factored=False).to_dense()


def ridge_backward(
    keys_NK: torch.Tensor,
    resid_NV: torch.Tensor,
    lam: float | torch.Tensor,
    grad_delta_KV: torch.Tensor,
    *,
    form: Form = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reverse mode of `ridge_delta` with respect to R̂ and λ (the meta-gradient's middle step).

    Args:
        keys_NK: keys K (N×K), constants.
        resid_NV: the residuals R̂ (N×V) the delta was solved from.
        lam: λ used in the forward solve.
        grad_delta_KV: Γ = ∂L/∂ΔW (K×V), e.g. the weight gradient of the edited model, in K×V orientation.
        form: which system to solve; both give the same result.

    Returns:
        (grad_resid_NV, grad_lam): ∂L/∂R̂ (N×V) and ∂L/∂λ (0-d tensor).
    """
    n, d_k = keys_NK.shape
    dtype = math_dtype(keys_NK, resid_NV, grad_delta_KV)
    keys_NK, resid_NV, grad_delta_KV = (t.to(dtype) for t in (keys_NK, resid_NV, grad_delta_KV))
    lam_t = _lam_tensor(lam, dtype, keys_NK.device)
    chosen = choose_form(n, d_k) if form == "auto" else form
    if chosen == "primal":
        system_KK = _ridge_system(keys_NK.T @ keys_NK, lam_t)
        # one solve with both right-hand sides: M⁻¹Γ and M⁻¹KᵀR̂ = ΔW
        rhs = torch.cat([grad_delta_KV, keys_NK.T @ resid_NV], dim=1)
        sol = torch.linalg.solve(system_KK, rhs)
        adj_KV, delta_KV = sol.split([grad_delta_KV.shape[1], resid_NV.shape[1]], dim=1)
        grad_resid_NV = keys_NK @ adj_KV
        grad_lam = -(adj_KV * delta_KV).sum()
        return grad_resid_NV, grad_lam
    system_NN = _ridge_system(keys_NK @ keys_NK.T, lam_t)
    rhs = torch.cat([keys_NK @ grad_delta_KV, resid_NV], dim=1)
    sol = torch.linalg.solve(system_NN, rhs)
    grad_resid_NV, coef_NV = sol.split([grad_delta_KV.shape[1], resid_NV.shape[1]], dim=1)
    grad_lam = -(grad_resid_NV * coef_NV).sum()
    return grad_resid_NV, grad_lam


def prior_cholesky(prior_KK: torch.Tensor | None, lam: float | torch.Tensor, d_k: int,
                   device: torch.device | None = None) -> torch.Tensor:
    """The Cholesky factor (K×K, float64) of A = λI + P (P = 0 when None): what `factored_solve` takes, computed
    once per prior and shared by every subject's solve with that prior."""
    if prior_KK is None:
        prior_KK = torch.zeros(d_k, d_k, dtype=torch.float64, device=device)
    p64 = prior_KK.to(torch.float64)
    return torch.linalg.cholesky(_ridge_system(p64, _lam_tensor(lam, torch.float64, p64.device)))


def prior_adjoint(keys_NK: torch.Tensor, chol_KK: torch.Tensor) -> torch.Tensor:
    """A⁻¹Kᵀ (K×N, float64) for a Cholesky factor of A (`prior_cholesky`): one call for the rows of many
    subjects that share a prior."""
    return torch.cholesky_solve(keys_NK.to(chol_KK).T, chol_KK)


def factored_solve(keys_NK: torch.Tensor, resid_NV: torch.Tensor, chol_KK: torch.Tensor | None = None, *,
                   adj_KN: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`preserving_solve` in its factored form for A = λI + P, given its Cholesky factor or A⁻¹Kᵀ
    (`prior_adjoint`): ΔW = A⁻¹Kᵀ (I + K A⁻¹ Kᵀ)⁻¹ R̂ = left_NKᵀ · coef_NV. Always factored (a subject's few
    answer tokens).

    Returns:
        (left_NK = (A⁻¹Kᵀ)ᵀ, coef_NV), float32.
    """
    if adj_KN is None:
        assert chol_KK is not None, "give chol_KK or adj_KN"
        adj_KN = prior_adjoint(keys_NK, chol_KK)
    k64, r64 = keys_NK.to(adj_KN), resid_NV.to(adj_KN)
    inner_NN = _ridge_system(k64 @ adj_KN, torch.ones((), dtype=torch.float64, device=k64.device))
    coef_NV = torch.linalg.solve(inner_NN, r64)
    return adj_KN.T.float().contiguous(), coef_NV.float().contiguous()
