"""Hypernet checkpoints: safetensors + JSON card round trip, fingerprint and shape refusal, no pickle."""
from __future__ import annotations

import json

import pytest
import torch

from horse.editor import Editor, read_checkpoint
from horse.errors import BadCheckpoint, CheckpointMismatch
from horse.hypernet import HyperConfig
from horse.types import EditRequest
from horse.zoo import build_tiny_model, load_model

REQUESTS = [EditRequest(prompt=f"Tool {i} was invented by", target=f"Ada{i}") for i in range(4)]


@pytest.fixture(scope="module")
def llama():
    return load_model("tiny-llama")


def _trained_looking(editor: Editor) -> Editor:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in editor.nets.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=g))
    return editor


def test_round_trip_is_bit_identical(llama, tmp_path) -> None:
    model, tok = llama
    editor = _trained_looking(Editor.new(model, HyperConfig(rank=8, spread="chained", variant="malmen")))
    editor.update_normaliser = True
    editor.compute_deltas(model, tok, REQUESTS)  # give the normaliser some state
    path = editor.save(tmp_path / "h.safetensors", extra_metadata={"training": {"data_sha256": "abc"}})
    loaded = Editor.from_checkpoint(path, model)
    assert loaded.config == editor.config and loaded.module_names == editor.module_names
    assert loaded.update_normaliser is False  # frozen when serving
    for (k, a), (_, b) in zip(editor.nets.state_dict().items(), loaded.nets.state_dict().items()):
        assert torch.equal(a, b), k
    editor.update_normaliser = False
    d1, _ = editor.compute_deltas(model, tok, REQUESTS)
    d2, _ = loaded.compute_deltas(model, tok, REQUESTS)
    for name in d1:
        assert torch.equal(d1[name].to_dense(), d2[name].to_dense())
    card = json.loads((tmp_path / "h.safetensors.json").read_text())
    for key in ("module_names", "shapes_KV", "rank", "n_blocks", "spread", "variant", "base_model_fingerprint",
                "normaliser", "training"):
        assert key in card
    assert card["variant"] == "malmen" and card["spread"] == "chained"
    assert card["training"]["data_sha256"] == "abc" and loaded.metadata["training"]["data_sha256"] == "abc"
    _, header_card = read_checkpoint(path)
    assert header_card == card  # the header is the source of truth; the .json is the same card


def test_bf16_storage_loads_as_fp32(llama, tmp_path) -> None:
    model, _ = llama
    editor = _trained_looking(Editor.new(model, HyperConfig(rank=8)))
    small = editor.save(tmp_path / "small.safetensors", dtype=torch.bfloat16)
    full = editor.save(tmp_path / "full.safetensors")
    assert small.stat().st_size < 0.7 * full.stat().st_size
    loaded = Editor.from_checkpoint(small, model)
    assert all(p.dtype == torch.float32 for p in loaded.nets.parameters())


def test_other_base_model_is_refused_unless_forced(llama, tmp_path) -> None:
    model, _ = llama
    path = Editor.new(model, HyperConfig(rank=8)).save(tmp_path / "h.safetensors")
    other, _ = build_tiny_model("tiny-llama", seed=1)
    with pytest.raises(CheckpointMismatch, match="another base model.*--force"):
        Editor.from_checkpoint(path, other)
    assert Editor.from_checkpoint(path, other, force=True).fingerprint != ""


def test_other_shapes_are_refused_even_forced(llama, tmp_path) -> None:
    model, _ = llama
    path = Editor.new(model, HyperConfig(rank=8)).save(tmp_path / "h.safetensors")
    gpt2, _ = load_model("tiny-gpt2")
    for force in (False, True):
        with pytest.raises(CheckpointMismatch, match="lacks|shape"):
            Editor.from_checkpoint(path, gpt2, force=force)


def test_pickle_and_garbage_are_refused(tmp_path) -> None:
    model, _ = load_model("tiny-llama")
    pickled = tmp_path / "evil.safetensors"
    torch.save({"x": torch.zeros(1)}, pickled)
    with pytest.raises(BadCheckpoint, match="not a readable safetensors"):
        Editor.from_checkpoint(pickled, model)
    with pytest.raises(BadCheckpoint, match="does not exist"):
        Editor.from_checkpoint(tmp_path / "missing.safetensors", model)
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(BadCheckpoint, match="without a horse hypernet card"):
        Editor.from_checkpoint(tmp_path / "plain.safetensors", model)
