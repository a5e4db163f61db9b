"""Ridge solve: primal = dual = a naive float64 solve; factored form; the adjoint against autograd."""
from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from horse.solve import choose_form, preserving_solve, ridge_backward, ridge_delta, ridge_solve


def naive_ridge_f64(keys_NK: torch.Tensor, resid_NV: torch.Tensor, lam: float) -> torch.Tensor:
    k = keys_NK.double()
    system = k.T @ k + lam * torch.eye(k.shape[1], dtype=torch.float64)
    return torch.linalg.inv(system) @ k.T @ resid_NV.double()


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 24), d_k=st.integers(1, 24), d_v=st.integers(1, 12),
    lam=st.floats(1e-2, 10.0), seed=st.integers(0, 2**16),
)
def test_primal_equals_dual_equals_naive(n: int, d_k: int, d_v: int, lam: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(n, d_k, generator=g, dtype=torch.float64)
    resid = torch.randn(n, d_v, generator=g, dtype=torch.float64)
    expected = naive_ridge_f64(keys, resid, lam)
    for form in ("primal", "dual", "auto"):
        got = ridge_delta(keys, resid, lam, form=form)
        assert got.dtype == torch.float64
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-10)


def test_float32_inputs_match_float64_reference() -> None:
    g = torch.Generator().manual_seed(0)
    keys, resid = torch.randn(30, 16, generator=g), torch.randn(30, 8, generator=g)
    expected = naive_ridge_f64(keys, resid, 1.0)
    torch.testing.assert_close(ridge_delta(keys, resid, 1.0, form="primal").double(), expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ridge_delta(keys, resid, 1.0, form="dual").double(), expected, rtol=1e-4, atol=1e-5)
    bf = ridge_delta(keys.bfloat16(), resid.bfloat16(), 1.0)
    assert bf.dtype == torch.float32  # fp32 inside whatever the input


def test_auto_picks_cheaper_system_and_factors_when_smaller() -> None:
    assert choose_form(n_tokens=10, d_k=64) == "dual"
    assert choose_form(n_tokens=100, d_k=64) == "primal"
    keys, resid = torch.randn(4, 64, dtype=torch.float64), torch.randn(4, 32, dtype=torch.float64)
    sol = ridge_solve(keys, resid, 0.5)
    assert sol.form == "dual" and sol.is_factored  # 4·(64+32) < 64·32
    assert sol.keys_NK.shape == (4, 64) and sol.coef_NV.shape == (4, 32)
    torch.testing.assert_close(sol.to_dense(), naive_ridge_f64(keys, resid, 0.5))
    big = ridge_solve(torch.randn(100, 64), torch.randn(100, 32), 0.5)
    assert big.form == "primal" and not big.is_factored


def test_lam_tensor_and_float_agree() -> None:
    keys, resid = torch.randn(5, 7, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    torch.testing.assert_close(ridge_delta(keys, resid, 0.3), ridge_delta(keys, resid, torch.tensor(0.3)))


def test_backward_matches_autograd_in_both_forms() -> None:
    g = torch.Generator().manual_seed(1)
    for n, d_k in ((6, 10), (12, 5)):
        keys = torch.randn(n, d_k, generator=g, dtype=torch.float64)
        resid = torch.randn(n, 4, generator=g, dtype=torch.float64, requires_grad=True)
        lam = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
        gamma = torch.randn(d_k, 4, generator=g, dtype=torch.float64)
        delta = torch.linalg.solve(keys.T @ keys + lam * torch.eye(d_k, dtype=torch.float64), keys.T @ resid)
        want_r, want_lam = torch.autograd.grad((delta * gamma).sum(), [resid, lam])
        for form in ("primal", "dual"):
            got_r, got_lam = ridge_backward(keys, resid.detach(), 0.7, gamma, form=form)
            torch.testing.assert_close(got_r, want_r, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(got_lam, want_lam, rtol=1e-10, atol=1e-12)


@settings(max_examples=20, deadline=None)
@given(n=st.integers(1, 20), d_k=st.integers(1, 20), d_v=st.integers(1, 10), lam=st.floats(1e-2, 10.0),
       seed=st.integers(0, 2**16))
def test_preserving_solve_matches_naive_and_reduces_to_ridge(n: int, d_k: int, d_v: int, lam: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(n, d_k, generator=g, dtype=torch.float64)
    resid = torch.randn(n, d_v, generator=g, dtype=torch.float64)
    text = torch.randn(3 * d_k, d_k, generator=g, dtype=torch.float64)
    prior = 5.0 * text.T @ text / text.shape[0]
    expected = torch.linalg.inv(keys.T @ keys + lam * torch.eye(d_k, dtype=torch.float64) + prior) @ keys.T @ resid
    torch.testing.assert_close(preserving_solve(keys, resid, lam, prior).to_dense(), expected, rtol=1e-8, atol=1e-10)
    plain = preserving_solve(keys, resid, lam, torch.zeros(d_k, d_k, dtype=torch.float64)).to_dense()
    torch.testing.assert_close(plain, ridge_delta(keys, resid, lam), rtol=1e-8, atol=1e-10)


def test_preserving_solve_protects_the_prior_directions() -> None:
    g = torch.Generator().manual_seed(1)
    keys, resid = torch.randn(8, 32, generator=g), torch.randn(8, 6, generator=g)
    text = torch.randn(200, 32, generator=g)  # "unrelated text" keys
    prior = text.T @ text / 200
    plain = ridge_delta(keys, resid, 1.0)
    for weight, limit in ((10.0, 0.8), (1000.0, 0.2)):
        kept = preserving_solve(keys, resid, 1.0, weight * prior)
        # the change on unrelated inputs shrinks as the prior's weight grows
        assert (text @ kept.to_dense()).norm() < limit * (text @ plain).norm()
    wide = torch.randn(8, 12, generator=g)  # N·(K+V) < K·V: the factored form is smaller
    factored = preserving_solve(keys, wide, 1.0, prior)
    assert factored.is_factored and factored.keys_NK.shape == (8, 32) and factored.coef_NV.shape == (8, 12)
    dense = preserving_solve(keys, wide, 1.0, prior, allow_factored=False)
    torch.testing.assert_close(dense.dense_KV, factored.to_dense(), rtol=1e-5, atol=1e-6)
