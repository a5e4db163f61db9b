"""THE KEY TEST: the two-stage meta-gradient equals plain autograd through the whole pipeline.

Autograd side, in float64 on a tiny model: captured K, G (constants) → hypernet residuals → spread (the same
function, so its stop-gradients on the previous layer sit at the same place) → differentiable ridge solve
(torch.linalg.solve with λ = exp(lamda)) → the edited model W + ΔW (a parametrization of the weights, not
the engine's output hooks) → meta-loss → torch.autograd.grad. Engine side: `horse.metatrain.meta_step`.
Every spread option × both loss variants × both solve forms (tiny-gpt2: N < K, dual; tiny-llama with more
tokens than K: primal). Relative error of the full gradient vector < 1e-6 (observed ~1e-13).
"""
from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from horse.arch import get_module, weight_layout
from horse.editor import Editor
from horse.hooks import frozen_parameters
from horse.hypernet import HyperConfig
from horse.metatrain import encode_meta_batch, meta_loss_terms, meta_step
from horse.solve import choose_form
from horse.spread import SPREAD_OPTIONS, spread_residuals
from horse.types import EditRequest
from horse.zoo import load_model


class _AddDelta(nn.Module):
    def __init__(self, delta: torch.Tensor) -> None:
        super().__init__()
        self.delta = delta

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.delta


def _requests(n: int) -> list[EditRequest]:
    return [
        EditRequest(
            prompt=f"Item {i} is made in", target=f"Land{i % 5}x",
            rephrases=(f"Where is item {i} made? In",),
            locality_prompt=f"Number {i} is followed by", locality_answer=str(i + 1),
        )
        for i in range(n)
    ]


def _perturb(editor: Editor, seed: int) -> None:
    """Move the hypernet off its identity init so every parameter gets a non-zero gradient."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in editor.nets.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=p.dtype)
            if name.endswith("A_DR"):
                p.mul_(0.2)
            elif name.endswith("eta_L"):
                p.copy_(0.05 * (1 + 0.1 * noise))
            elif name.endswith("lamda_L"):
                p.copy_(0.3 * noise)
            else:
                p.add_(0.05 * noise)


def _reference_grads(editor: Editor, model, tok, requests, captured) -> list[torch.Tensor]:
    names = editor.module_names
    stats = editor.normaliser_stats(captured, update=False)
    resids = editor.residuals(captured, stats)
    spread = spread_residuals(resids, [captured.grads_NV[n] for n in names], editor.config.spread)
    deltas = {}
    for name, r_hat in zip(names, spread):
        net, layer = editor.nets.net_for(name)
        k = captured.keys_NK[name]
        lam = net.lamda_L[layer].exp()
        delta_KV = torch.linalg.solve(k.T @ k + lam * torch.eye(k.shape[1], dtype=k.dtype), k.T @ r_hat)
        module = get_module(model, name)
        deltas[name] = delta_KV if weight_layout(module) == "in_out" else delta_KV.T

    @contextmanager
    def edited():
        for name, d in deltas.items():
            parametrize.register_parametrization(get_module(model, name), "weight", _AddDelta(d))
        try:
            yield
        finally:
            for name in deltas:
                parametrize.remove_parametrizations(get_module(model, name), "weight", leave_parametrized=False)

    batch = encode_meta_batch(tok, requests, 4, torch.device("cpu"))
    with frozen_parameters(model):
        loss = sum(t for _, t in meta_loss_terms(model, batch, edited, variant=editor.config.variant,
                                                  loc_coef=editor.config.loc_coef))
    params = list(editor.nets.parameters())
    return list(torch.autograd.grad(loss, params))


@pytest.fixture(scope="module")
def models():
    out = {}
    for name in ("tiny-gpt2", "tiny-llama"):
        model, tok = load_model(name)
        out[name] = (model.double(), tok)
    return out


CASES = [(m, s, v) for m in ("tiny-gpt2", "tiny-llama") for s in SPREAD_OPTIONS for v in ("horse", "malmen")]


@pytest.mark.parametrize("model_name,spread,variant", CASES)
def test_two_stage_gradient_equals_autograd(models, model_name: str, spread: str, variant: str) -> None:
    model, tok = models[model_name]
    n_requests = 5 if model_name == "tiny-gpt2" else 25
    requests = _requests(n_requests)
    config = HyperConfig(rank=12, n_blocks=2, spread=spread, variant=variant, chunk_tokens=7, loc_coef=0.7)
    editor = Editor.new(model, config)
    editor.nets.double()
    _perturb(editor, seed=1)
    captured = editor.capture(model, tok, requests, lm_batch_size=4)
    editor.normaliser_stats(captured, update=True)  # prime once; both sides then use the same frozen stats
    d_k = captured.keys_NK[editor.module_names[0]].shape[1]
    expected_form = "dual" if model_name == "tiny-gpt2" else "primal"
    assert choose_form(captured.n_tokens, d_k) == expected_form

    meta_step(editor, model, tok, requests, lm_batch_size=4, update_normaliser=False, train_lambda=True)
    engine = [p.grad.detach().clone() for p in editor.nets.parameters()]
    reference = _reference_grads(editor, model, tok, requests, captured)

    flat_e = torch.cat([g.flatten() for g in engine])
    flat_r = torch.cat([g.flatten() for g in reference])
    rel = float((flat_e - flat_r).norm() / flat_r.norm())
    print(f"{model_name} {spread} {variant}: relative error {rel:.2e}")
    assert rel < 1e-6
    for (name, _), e, r in zip(editor.nets.named_parameters(), engine, reference):
        assert float(r.norm()) > 0, f"{name} has a zero reference gradient; the test would not check it"
        assert float((e - r).norm()) <= 1e-6 * float(r.norm()) + 1e-14, name
