"""horse/deltas.py: exact apply / remove, layouts, file round trip, refusal of non-finite deltas, atomicity."""
from __future__ import annotations

import hashlib
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from horse.arch import default_target_modules, get_module, module_shape_KV, module_weight_KV
from horse.deltas import (
    BadDeltaFile,
    LayerDelta,
    add_deltas_,
    apply_deltas,
    fingerprint_modules,
    frobenius_norms,
    load_deltas,
    save_deltas,
    sum_deltas,
)
from horse.errors import EngineError, NonFiniteDelta
from horse.zoo import build_tiny_model


def random_deltas(model, seed: int = 0, scale: float = 1e-2, factored_every: int = 2):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i, name in enumerate(default_target_modules(model)):
        k, v = module_shape_KV(get_module(model, name))
        if i % factored_every == 0:
            out[name] = LayerDelta(keys_NK=torch.randn(3, k, generator=g), coef_NV=scale * torch.randn(3, v, generator=g))
        else:
            out[name] = LayerDelta(dense_KV=scale * torch.randn(k, v, generator=g))
    return out


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_bit_identical(model, snap):
    for n, p in model.named_parameters():
        assert p.dtype == snap[n].dtype
        assert torch.equal(p.detach().view(torch.uint8), snap[n].view(torch.uint8)), n


def test_layer_delta_forms():
    keys, coef = torch.randn(2, 5), torch.randn(2, 7)
    d = LayerDelta.from_factors(keys, coef)
    assert d.is_factored and d.shape_KV == (5, 7)
    torch.testing.assert_close(d.to_dense(), keys.t() @ coef)
    dense = LayerDelta.from_factors(torch.randn(4, 5), torch.randn(4, 7))  # 4·12 > 35: dense is smaller
    assert not dense.is_factored
    assert d.nbytes == (10 + 14) * 4
    with pytest.raises(EngineError):
        LayerDelta()
    with pytest.raises(EngineError):
        LayerDelta(dense_KV=torch.zeros(2, 2), keys_NK=torch.zeros(1, 2), coef_NV=torch.zeros(1, 2))
    with pytest.raises(EngineError, match="rows"):
        LayerDelta(keys_NK=torch.zeros(2, 5), coef_NV=torch.zeros(3, 7))
    assert LayerDelta(dense_KV=torch.zeros(2, 2, dtype=torch.float64)).dense_KV.dtype == torch.float32


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_apply_adds_delta_in_module_layout(name):
    model, _ = build_tiny_model(name)
    target = default_target_modules(model)[-1]
    module = get_module(model, target)
    k, v = module_shape_KV(module)
    delta_KV = torch.randn(k, v) * 0.1
    before_KV = module_weight_KV(module).detach().clone()
    x_NK = torch.randn(4, k)
    y_before = module(x_NK)
    with apply_deltas(model, {target: LayerDelta(dense_KV=delta_KV)}):
        torch.testing.assert_close(module_weight_KV(module), before_KV + delta_KV)
        # the module's forward sees x @ (W + Δ): the K×V convention holds for Conv1D and Linear alike
        torch.testing.assert_close(module(x_NK), y_before + x_NK @ delta_KV, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(module(x_NK), y_before, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_apply_remove_is_bit_identical(name, dtype):
    model, _ = build_tiny_model(name)
    model = model.to(dtype)
    snap = snapshot(model)
    deltas = random_deltas(model)
    handle = apply_deltas(model, deltas)
    assert handle.is_applied
    changed = get_module(model, default_target_modules(model)[0]).weight
    assert not torch.equal(changed, snap[default_target_modules(model)[0] + ".weight"])
    handle.remove()
    assert_bit_identical(model, snap)
    handle.remove()  # idempotent
    assert_bit_identical(model, snap)


def test_bf16_apply_matches_fp32_math():
    model, _ = build_tiny_model("tiny-llama")
    model = model.to(torch.bfloat16)
    deltas = random_deltas(model)
    name = default_target_modules(model)[1]
    w = get_module(model, name).weight.detach().clone()
    expected = (w.float() + deltas[name].to_dense().t()).to(torch.bfloat16)
    add_deltas_(model, deltas)
    assert torch.equal(get_module(model, name).weight, expected)


def test_apply_is_deterministic():
    m1, _ = build_tiny_model("tiny-gpt2")
    m2, _ = build_tiny_model("tiny-gpt2")
    add_deltas_(m1, random_deltas(m1))
    add_deltas_(m2, random_deltas(m2))
    for (_, p1), (_, p2) in zip(m1.named_parameters(), m2.named_parameters()):
        assert torch.equal(p1, p2)


def test_non_finite_delta_changes_nothing():
    model, _ = build_tiny_model("tiny-llama")
    snap = snapshot(model)
    deltas = random_deltas(model)
    last = list(deltas)[-1]
    bad = deltas[last].to_dense().clone()
    bad[0, 0] = float("nan")
    deltas[last] = LayerDelta(dense_KV=bad)
    with pytest.raises(NonFiniteDelta, match=last):
        apply_deltas(model, deltas)
    with pytest.raises(NonFiniteDelta):
        add_deltas_(model, deltas)
    assert_bit_identical(model, snap)


def test_wrong_shape_is_refused_before_writing():
    model, _ = build_tiny_model("tiny-llama")
    snap = snapshot(model)
    deltas = random_deltas(model)
    deltas[list(deltas)[-1]] = LayerDelta(dense_KV=torch.zeros(3, 3))
    with pytest.raises(EngineError, match="another model"):
        apply_deltas(model, deltas)
    assert_bit_identical(model, snap)


def test_save_load_round_trip_and_sha(tmp_path):
    model, _ = build_tiny_model("tiny-gpt2")
    deltas = random_deltas(model)
    path = tmp_path / "d.safetensors"
    digest = save_deltas(path, deltas, {"base_model": "tiny-gpt2", "snapshot_id": "7"})
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    loaded, meta = load_deltas(path)
    assert meta == {"base_model": "tiny-gpt2", "snapshot_id": "7"}
    assert list(loaded) == list(deltas)
    for name in deltas:
        assert loaded[name].is_factored == deltas[name].is_factored
        for field, t in deltas[name].tensors().items():
            assert torch.equal(loaded[name].tensors()[field], t)
    assert [p.name for p in tmp_path.iterdir()] == ["d.safetensors"]  # no temp file left behind


def test_save_refuses_nan_and_writes_nothing(tmp_path):
    path = tmp_path / "d.safetensors"
    with pytest.raises(NonFiniteDelta):
        save_deltas(path, {"a.b": LayerDelta(dense_KV=torch.tensor([[float("inf")]]))}, {})
    assert list(tmp_path.iterdir()) == []


def test_save_refuses_reserved_metadata(tmp_path):
    with pytest.raises(EngineError, match="reserved"):
        save_deltas(tmp_path / "d", {"a.b": LayerDelta(dense_KV=torch.zeros(1, 1))}, {"horse.format": "x"})


def test_failed_write_leaves_no_temp_and_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "d.safetensors"
    save_deltas(path, {"a.b": LayerDelta(dense_KV=torch.ones(1, 1))}, {})
    old = path.read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        save_deltas(path, {"a.b": LayerDelta(dense_KV=torch.zeros(1, 1))}, {})
    assert path.read_bytes() == old
    assert [p.name for p in tmp_path.iterdir()] == ["d.safetensors"]


def test_load_refuses_foreign_and_corrupt_files(tmp_path):
    from safetensors.torch import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({"x": torch.zeros(1)}, str(foreign))
    with pytest.raises(BadDeltaFile, match="not a horse delta file"):
        load_deltas(foreign)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x80\x04not a safetensors file")
    with pytest.raises(BadDeltaFile, match="cannot read"):
        load_deltas(garbage)
    nan = tmp_path / "nan.safetensors"
    save_file(
        {"a.b::dense_KV": torch.tensor([[float("nan")]])},
        str(nan),
        metadata={"horse.format": "horse-deltas/1", "horse.layers": '["a.b"]'},
    )
    with pytest.raises(BadDeltaFile, match="NaN"):
        load_deltas(nan)


finite = st.floats(allow_nan=False, allow_infinity=False, width=32)


@settings(max_examples=30, deadline=None)
@given(
    k=st.integers(1, 6),
    v=st.integers(1, 6),
    n=st.integers(1, 4),
    factored=st.booleans(),
    data=st.data(),
)
def test_round_trip_is_bit_identical_hypothesis(tmp_path_factory, k, v, n, factored, data):
    def mat(rows, cols):
        values = data.draw(st.lists(finite, min_size=rows * cols, max_size=rows * cols))
        return torch.tensor(values, dtype=torch.float32).reshape(rows, cols)

    if factored:
        delta = LayerDelta(keys_NK=mat(n, k), coef_NV=mat(n, v))
    else:
        delta = LayerDelta(dense_KV=mat(k, v))
    meta = data.draw(st.dictionaries(st.text(min_size=1).filter(lambda s: not s.startswith("horse.")), st.text(), max_size=3))
    path = tmp_path_factory.mktemp("rt") / "d.safetensors"
    save_deltas(path, {"model.layers.0.mlp.down_proj": delta}, meta)
    loaded, meta2 = load_deltas(path)
    assert meta2 == meta
    got = loaded["model.layers.0.mlp.down_proj"]
    for field, t in delta.tensors().items():
        assert torch.equal(got.tensors()[field].view(torch.int32), t.view(torch.int32))  # bits, incl. -0.0


def test_sum_deltas_is_exact():
    a = {"m": LayerDelta(keys_NK=torch.randn(1, 8), coef_NV=torch.randn(1, 8))}
    b = {"m": LayerDelta(keys_NK=torch.randn(2, 8), coef_NV=torch.randn(2, 8)), "n": LayerDelta(dense_KV=torch.ones(2, 2))}
    s = sum_deltas(a, b)
    assert s["m"].is_factored and s["m"].keys_NK.shape == (3, 8)
    torch.testing.assert_close(s["m"].to_dense(), a["m"].to_dense() + b["m"].to_dense())
    assert torch.equal(s["n"].dense_KV, torch.ones(2, 2))
    c = {"m": LayerDelta(dense_KV=torch.ones(8, 8))}
    torch.testing.assert_close(sum_deltas(a, c)["m"].to_dense(), a["m"].to_dense() + 1)
    with pytest.raises(EngineError, match="shapes"):
        sum_deltas(a, {"m": LayerDelta(dense_KV=torch.ones(2, 2))})


def test_frobenius_norms_factored_equals_dense():
    d = LayerDelta(keys_NK=torch.randn(3, 10), coef_NV=torch.randn(3, 7))
    norms = frobenius_norms({"x": d, "y": LayerDelta(dense_KV=d.to_dense())})
    assert norms["x"] == pytest.approx(norms["y"], rel=1e-5)
    assert norms["x"] == pytest.approx(float(torch.linalg.matrix_norm(d.to_dense())), rel=1e-5)


def test_fingerprint():
    m1, _ = build_tiny_model("tiny-llama")
    names = default_target_modules(m1)
    fp = fingerprint_modules(m1, names)
    assert fp == fingerprint_modules(build_tiny_model("tiny-llama")[0], names)
    assert fp == fingerprint_modules(m1.to(torch.bfloat16), names)  # same base model served in bf16
    m2, _ = build_tiny_model("tiny-llama")
    add_deltas_(m2, {names[0]: LayerDelta(dense_KV=torch.full(module_shape_KV(get_module(m2, names[0])), 0.5))})
    assert fingerprint_modules(m2, names) != fp
    assert fingerprint_modules(m1, names[:2]) != fp
    m3, _ = build_tiny_model("tiny-llama")
    with apply_deltas(m3, random_deltas(m3)):
        pass
    assert fingerprint_modules(m3, names) == fp  # removal restores the fingerprint
