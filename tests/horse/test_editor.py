"""Editor.new + compute_deltas on tiny models: shapes, forms, no weight changes, determinism, bf16."""
from __future__ import annotations

import pytest
import torch

from horse.arch import default_target_modules, get_module, module_shape_KV
from horse.deltas import apply_deltas
from horse.editor import Editor
from horse.errors import EngineError
from horse.hypernet import HyperConfig
from horse.types import EditRequest
from horse.zoo import load_model

REQUESTS = [EditRequest(prompt=f"The capital of land {i} is", target=f"Town{i}") for i in range(6)]


@pytest.fixture(scope="module", params=["tiny-gpt2", "tiny-llama"])
def model_tok(request):
    return load_model(request.param)


def test_compute_deltas_shapes_and_timings(model_tok) -> None:
    model, tok = model_tok
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    editor = Editor.new(model, HyperConfig(rank=16))
    assert editor.module_names == default_target_modules(model)
    deltas, timings = editor.compute_deltas(model, tok, REQUESTS, lm_batch_size=4)
    assert set(deltas) == set(editor.module_names)
    for name, d in deltas.items():
        assert d.shape_KV == module_shape_KV(get_module(model, name))
        assert d.is_finite() and d.to_dense().dtype == torch.float32
    assert {"capture", "hypernet", "spread", "solve", "total"} <= set(timings)
    for n, p in model.named_parameters():  # the editor never writes weights
        assert torch.equal(p, before[n])
    # deterministic and stateless when serving (normaliser not updated)
    again, _ = editor.compute_deltas(model, tok, REQUESTS, lm_batch_size=4)
    for name in deltas:
        torch.testing.assert_close(again[name].to_dense(), deltas[name].to_dense())
    assert float(next(iter(editor.nets.nets.values())).normaliser.count) == 0


def test_lm_batch_size_changes_only_scale_of_grads(model_tok) -> None:
    """Capture in one mini-batch or several: the keys are identical (row order kept)."""
    model, tok = model_tok
    editor = Editor.new(model, HyperConfig(rank=8))
    a = editor.capture(model, tok, REQUESTS, lm_batch_size=6)
    b = editor.capture(model, tok, REQUESTS, lm_batch_size=2)
    for name in editor.module_names:
        torch.testing.assert_close(a.keys_NK[name], b.keys_NK[name], rtol=1e-5, atol=1e-6)


def test_update_normaliser_accumulates(model_tok) -> None:
    model, tok = model_tok
    editor = Editor.new(model, HyperConfig(rank=8))
    editor.update_normaliser = True
    editor.compute_deltas(model, tok, REQUESTS[:3])
    net = next(iter(editor.nets.nets.values()))
    first = float(net.normaliser.count)
    editor.compute_deltas(model, tok, REQUESTS[3:])
    assert first > 0 and float(net.normaliser.count) > first


def test_apply_changes_predictions_and_restores(model_tok) -> None:
    model, tok = model_tok
    editor = Editor.new(model, HyperConfig(rank=8, spread="none"))
    deltas, _ = editor.compute_deltas(model, tok, REQUESTS)
    name = editor.module_names[-1]
    before = get_module(model, name).weight.detach().clone()
    with apply_deltas(model, deltas):
        assert not torch.equal(get_module(model, name).weight, before)
    assert torch.equal(get_module(model, name).weight, before)


def test_bf16_model() -> None:
    model, tok = load_model("tiny-llama", dtype=torch.bfloat16)
    editor = Editor.new(model, HyperConfig(rank=8))
    deltas, _ = editor.compute_deltas(model, tok, REQUESTS)
    assert all(d.to_dense().dtype == torch.float32 and d.is_finite() for d in deltas.values())


def test_no_requests_is_refused(model_tok) -> None:
    model, tok = model_tok
    with pytest.raises(EngineError, match="no requests"):
        Editor.new(model, HyperConfig(rank=8)).compute_deltas(model, tok, [])


def test_preservation_prior_is_a_serving_option(model_tok) -> None:
    from horse.metatrain import meta_step

    model, tok = model_tok
    editor = Editor.new(model, HyperConfig(rank=16))
    plain, _ = editor.compute_deltas(model, tok, REQUESTS, lm_batch_size=4)
    eye = {n: torch.eye(module_shape_KV(get_module(model, n))[0]) for n in editor.module_names}
    editor.set_preservation(eye, 0.0)  # weight 0 keeps the plain solve
    assert editor.preserve_KK is None
    editor.set_preservation(eye, 1e6)
    kept, _ = editor.compute_deltas(model, tok, REQUESTS, lm_batch_size=4)
    for name in plain:
        assert kept[name].to_dense().norm() < 1e-3 * plain[name].to_dense().norm()
    with pytest.raises(EngineError, match="serving option"):
        meta_step(editor, model, tok, [EditRequest(prompt="a b", target="c", rephrases=("a b",))])
    with pytest.raises(EngineError, match="second moments"):
        editor.set_preservation({}, 1.0)
    with pytest.raises(EngineError, match="≥ 0"):
        editor.set_preservation(eye, -1.0)
    editor.set_preservation(eye, 1e4, 2.0, floor=1.0)  # μ(N) = max(1e4 / N², 1)
    assert [editor.preserve_mu(n) for n in (1, 10, 100, 1000)] == [1e4, 100.0, 1.0, 1.0]
    editor.set_preservation(eye, 1e4, 2.0)
    assert editor.preserve_mu(1000) == pytest.approx(0.01)


def test_protected_keys_keep_earlier_edits_outputs(model_tok) -> None:
    """ν·KₑᵀKₑ in the solve: a new batch's ΔW moves the earlier batch's keys less the larger ν is."""
    from horse.editor import solutions_to_deltas
    from horse.metatrain import meta_step

    model, tok = model_tok
    editor = Editor.new(model, HyperConfig(rank=16))
    earlier = editor.capture(model, tok, REQUESTS[:3], lm_batch_size=4)
    later = editor.capture(model, tok, REQUESTS[3:], lm_batch_size=4)
    kk = editor.keys_second_moments(earlier)
    name = editor.module_names[0]
    assert kk[name].shape == (earlier.keys_NK[name].shape[1],) * 2
    keys_only = editor.capture_keys(model, tok, REQUESTS[:3], lm_batch_size=2)  # forward only, other batching
    for n in editor.module_names:
        assert torch.allclose(keys_only[n], earlier.keys_NK[n], atol=1e-5), n
    by_chunks = editor.requests_second_moments(model, tok, REQUESTS[:3], chunk_edits=2)  # what a fold keeps
    for n in editor.module_names:
        assert torch.allclose(by_chunks[n], kk[n], rtol=1e-5, atol=1e-6), n

    def moved(nu: float) -> float:  # ‖Kₑ ΔW‖ of the later batch's delta on the earlier keys
        editor.set_protected_keys(kk, nu)
        deltas = solutions_to_deltas(editor.module_names, editor.predict(later, n_edits=3).solutions)
        return float((earlier.keys_NK[name].double() @ deltas[name].to_dense().double()).norm())

    plain, soft, hard = moved(0.0), moved(1.0), moved(1e6)
    assert editor.protect_KK is not None and plain > 0
    assert hard < soft < plain and hard < 1e-3 * plain
    editor.set_protected_keys(kk, 0.0)  # weight 0 restores the plain solve
    assert editor.protect_KK is None and moved(0.0) == pytest.approx(plain)
    editor.set_protected_keys(kk, 1.0)
    with pytest.raises(EngineError, match="serving option"):
        meta_step(editor, model, tok, [EditRequest(prompt="a b", target="c", rephrases=("a b",))])
    with pytest.raises(EngineError, match="key moments"):
        editor.set_protected_keys({}, 1.0)
    with pytest.raises(EngineError, match="≥ 0"):
        editor.set_protected_keys(kk, -1.0)
