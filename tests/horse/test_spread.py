"""Residual spread options: orthogonality, the reference rule, and the adjoint against autograd."""
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


@pytest.mark.parametrize("option", SPREAD_OPTIONS)
def test_backward_matches_autograd_with_stop_gradients(option: str) -> None:
    resids, grads = _layers(seed=3)
    leaves = [r.clone().requires_grad_(True) for r in resids]
    out = spread_residuals(leaves, grads, option)  # type: ignore[arg-type]
    upstream = [torch.randn_like(o) for o in out]
    loss = sum((o * u).sum() for o, u in zip(out, upstream))
    want = torch.autograd.grad(loss, leaves, allow_unused=True)
    got = spread_backward(resids, grads, upstream, option)  # type: ignore[arg-type]
    for w, g_ in zip(want, got):
        torch.testing.assert_close(g_, torch.zeros_like(g_) if w is None else w, rtol=1e-10, atol=1e-12)
