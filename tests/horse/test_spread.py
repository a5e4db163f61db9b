"""Residual spread options: orthogonality, the reference rule, and the adjoint against finite differences."""
from __future__ import annotations

import pytest
import torch

from horse.errors import EngineError
from horse.spread import SPREAD_OPTIONS, spread_backward, spread_residuals


def _layers(n_layers: int = 4, n: int = 9, d_v: int = 5, seed: int = 0) -> tuple[list, list]:
    g = torch.Generator().manual_seed(seed)
    resids = [torch.randn(n, d_v, generator=g, dtype=torch.float64) for _ in range(n_layers)]
    grads = [torch.randn(n, d_v, generator=g, dtype=torch.float64) for _ in range(n_layers)]
    return resids, grads


def _inner(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a * b).sum())


def test_orthogonal_is_orthogonal_to_previous_unprojected() -> None:
    resids, grads = _layers()
    out = spread_residuals(resids, grads, "orthogonal")
    torch.testing.assert_close(out[0], resids[0])
    for layer in range(1, len(resids)):
        assert abs(_inner(out[layer], resids[layer - 1])) < 1e-10


def test_chained_and_gram_schmidt() -> None:
    resids, grads = _layers()
    chained = spread_residuals(resids, grads, "chained")
    for layer in range(1, len(resids)):
        assert abs(_inner(chained[layer], chained[layer - 1])) < 1e-10
    gs = spread_residuals(resids, grads, "gram-schmidt")
    for i in range(len(gs)):
        for j in range(i):
            assert abs(_inner(gs[i], gs[j])) < 1e-10


def test_reference_subtracts_previous_gradient() -> None:
    resids, grads = _layers()
    out = spread_residuals(resids, grads, "reference")
    for layer in range(1, len(resids)):
        c = _inner(resids[layer], resids[layer - 1]) / _inner(resids[layer - 1], resids[layer - 1])
        torch.testing.assert_close(out[layer], resids[layer] - c * grads[layer - 1])


def test_none_is_identity_and_zero_previous_is_safe() -> None:
    resids, grads = _layers()
    for a, b in zip(spread_residuals(resids, grads, "none"), resids):
        assert a is b
    zero = [torch.zeros(3, 2, dtype=torch.float64), torch.ones(3, 2, dtype=torch.float64)]
    for option in SPREAD_OPTIONS:
        out = spread_residuals(zero, zero, option)
        assert all(torch.isfinite(o).all() for o in out)


def test_unknown_option_and_shape_mismatch_raise() -> None:
    resids, grads = _layers()
    with pytest.raises(EngineError, match="unknown spread"):
        spread_residuals(resids, grads, "sideways")  # type: ignore[arg-type]
    with pytest.raises(EngineError, match="same residual shape"):
        spread_residuals([torch.zeros(3, 2), torch.zeros(3, 4)], [torch.zeros(3, 2)] * 2, "orthogonal")


def _constants(resids: list, grads: list, option: str) -> list[list[tuple]]:
    """Per layer l, the (p, q) pairs of its projections r ↦ r − ⟨r, p⟩/‖p‖² · q, in order; p and q are the
    stop-gradient quantities of the module docstring, computed once from the unperturbed forward pass."""
    out = spread_residuals(resids, grads, option)  # type: ignore[arg-type]
    consts: list[list[tuple]] = [[]]
    for l in range(1, len(resids)):
        if option == "none":
            consts.append([])
        elif option == "reference":
            consts.append([(resids[l - 1], grads[l - 1])])
        elif option == "orthogonal":
            consts.append([(resids[l - 1], resids[l - 1])])
        elif option == "chained":
            consts.append([(out[l - 1], out[l - 1])])
        else:  # gram-schmidt
            consts.append([(out[j], out[j]) for j in range(l)])
    return consts


def _frozen_layer(r: torch.Tensor, pairs: list[tuple]) -> torch.Tensor:
    for p, q in pairs:
        r = r - (r * p).sum() / (p * p).sum() * q
    return r


def _hand_vjp(u: torch.Tensor, pairs: list[tuple]) -> torch.Tensor:
    """The transpose of the projections, applied in reverse: (r ↦ r − ⟨r,p⟩/‖p‖² q)ᵀ u = u − ⟨u,q⟩/‖p‖² p."""
    for p, q in reversed(pairs):
        u = u - (u * q).sum() / (p * p).sum() * p
    return u


@pytest.mark.parametrize("option", SPREAD_OPTIONS)
def test_backward_matches_finite_differences_and_the_hand_derived_adjoint(option: str) -> None:
    """spread_backward against (a) central finite differences of L = Σ_l ⟨R̂^l, U^l⟩ in every coordinate of
    every R^l, the stop-gradient quantities held at their values, and (b) the transposed projections. Neither
    reference uses autograd, so a wrong adjoint (or a wrong stop-gradient) fails here."""
    resids, grads = _layers(seed=3)
    g = torch.Generator().manual_seed(7)
    upstream = [torch.randn(r.shape, generator=g, dtype=torch.float64) for r in resids]
    consts = _constants(resids, grads, option)
    # the frozen forward reproduces the module's forward exactly
    for l, r in enumerate(resids):
        torch.testing.assert_close(_frozen_layer(r, consts[l]), spread_residuals(resids, grads, option)[l])  # type: ignore[arg-type]
    got = spread_backward(resids, grads, upstream, option)  # type: ignore[arg-type]
    eps = 1e-6
    for l, r in enumerate(resids):
        fd = torch.zeros_like(r)
        for idx in range(r.numel()):
            step = torch.zeros(r.numel(), dtype=r.dtype)
            step[idx] = eps
            step = step.view_as(r)
            plus = _inner(_frozen_layer(r + step, consts[l]), upstream[l])
            minus = _inner(_frozen_layer(r - step, consts[l]), upstream[l])
            fd.view(-1)[idx] = (plus - minus) / (2 * eps)
        torch.testing.assert_close(got[l], fd, rtol=1e-6, atol=1e-8)
        torch.testing.assert_close(got[l], _hand_vjp(upstream[l], consts[l]), rtol=1e-10, atol=1e-12)
    if option != "none":  # the check can fail: the identity (no spread) is not the adjoint of a real spread
        assert any(not torch.allclose(a, u) for a, u in zip(got[1:], upstream[1:]))
