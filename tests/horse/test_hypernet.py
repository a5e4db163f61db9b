"""Hypernet: identity at init, Welford normaliser, residual formula, one net per shape, config checks."""
from __future__ import annotations

import pytest
import torch

from horse.errors import EngineError
from horse.hypernet import HyperConfig, HyperNet, HyperNetSet, RunningNormaliser, layer_residuals


def test_welford_matches_batch_statistics() -> None:
    g = torch.Generator().manual_seed(0)
    parts = [torch.randn(n, 5, generator=g, dtype=torch.float64) * 3 + 1 for n in (7, 1, 20, 4)]
    norm = RunningNormaliser(5)
    assert not norm.has_stats
    for p in parts:
        norm.update(p)
    everything = torch.cat(parts)
    mean, std = norm.stats_for(torch.zeros(1, 5))
    torch.testing.assert_close(mean, everything.mean(0))
    torch.testing.assert_close(std, everything.std(0))
    assert float(norm.count) == everything.shape[0]


def test_empty_normaliser_uses_batch_statistics_without_storing() -> None:
    norm = RunningNormaliser(3)
    x = torch.randn(10, 3, dtype=torch.float64)
    mean, std = norm.stats_for(x)
    torch.testing.assert_close(mean, x.mean(0))
    torch.testing.assert_close(std, x.std(0))
    assert float(norm.count) == 0 and not norm.has_stats


def test_identity_at_init_and_residual_formula() -> None:
    net = HyperNet(6, 4, rank=3, n_blocks=2, n_layers=2, eta_init=1e-5)
    keys, grads = torch.randn(9, 6), torch.randn(9, 4)
    stats = (torch.zeros(10, dtype=torch.float64), torch.ones(10, dtype=torch.float64))
    ktil, gtil = net(keys, grads, 1, stats)
    torch.testing.assert_close(ktil, keys, rtol=1e-6, atol=1e-6)  # B = 0: identity (unit stats)
    torch.testing.assert_close(gtil, grads, rtol=1e-6, atol=1e-6)
    r = net.residuals(keys, grads, 1, stats)
    expected = -1e-5 * (keys * keys).sum(-1, keepdim=True) * grads  # r_i = −η ⟨k_i, k̃_i⟩ g̃_i with k̃ = k
    torch.testing.assert_close(r, expected, rtol=1e-5, atol=1e-12)
    assert float(net.lam(0).detach()) == pytest.approx(1.0)


def test_every_block_parameter_learns_from_the_identity_init() -> None:
    """At init B = 0 and b = 0 put each pre-activation at exactly 0; the rectifier must still pass the
    gradient there (reference: clamp(0)), or B, b and scale stay frozen and only η, λ and shift train."""
    net = HyperNet(6, 4, rank=3, n_blocks=2, n_layers=2, eta_init=1e-5)
    keys, grads = torch.randn(9, 6), torch.randn(9, 4)
    stats = (torch.zeros(10, dtype=torch.float64), torch.ones(10, dtype=torch.float64))
    net.residuals(keys, grads, 0, stats).square().sum().backward()
    last = net.blocks[-1]
    assert last.B_RD.grad.abs().sum() > 0 and last.bias_D.grad.abs().sum() > 0
    assert net.blocks[0].B_RD.grad.abs().sum() > 0
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    opt.step()
    opt.zero_grad()
    net.residuals(keys, grads, 0, stats).square().sum().backward()
    assert all(b.scale_LD.grad[0].abs().sum() > 0 and b.A_DR.grad.abs().sum() > 0 for b in net.blocks)


def test_chunking_does_not_change_residuals() -> None:
    net = HyperNet(6, 4, rank=3, n_blocks=2, n_layers=1, eta_init=0.1)
    with torch.no_grad():
        for b in net.blocks:
            b.B_RD.normal_()
    keys, grads = torch.randn(25, 6), torch.randn(25, 4)
    stats = (torch.randn(10, dtype=torch.float64), torch.rand(10, dtype=torch.float64) + 0.5)
    torch.testing.assert_close(
        layer_residuals(net, 0, keys, grads, stats, chunk_tokens=4),
        layer_residuals(net, 0, keys, grads, stats, chunk_tokens=1000),
    )


def test_one_net_per_shape_with_per_layer_tables() -> None:
    names = ["a.0", "a.1", "b.0", "a.2"]
    shapes = [(8, 4), (8, 4), (6, 4), (8, 4)]
    nets = HyperNetSet(HyperConfig(rank=2, n_blocks=1), names, shapes)
    assert set(nets.nets) == {"8x4", "6x4"}
    assert nets.slots == {"a.0": ("8x4", 0), "a.1": ("8x4", 1), "b.0": ("6x4", 0), "a.2": ("8x4", 2)}
    net, layer = nets.net_for("a.2")
    assert net.eta_L.shape == (3,) and layer == 2 and net.blocks[0].scale_LD.shape == (3, 12)


def test_config_validation_and_round_trip() -> None:
    with pytest.raises(EngineError, match="unknown spread"):
        HyperConfig(spread="diagonal")  # type: ignore[arg-type]
    with pytest.raises(EngineError, match="unknown variant"):
        HyperConfig(variant="rome")  # type: ignore[arg-type]
    cfg = HyperConfig(rank=7, module_names=("x", "y"), variant="malmen", spread="none")
    assert HyperConfig.from_dict(cfg.to_dict()) == cfg
