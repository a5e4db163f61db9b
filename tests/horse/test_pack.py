"""`horse-ledger hypernet pack`: a smaller copy that still loads and edits the same way."""
from __future__ import annotations

import json

import torch
from click.testing import CliRunner

from horse.cli import hypernet
from horse.editor import Editor, read_checkpoint
from horse.hypernet import HyperConfig
from horse.types import EditRequest

REQUESTS = [EditRequest(prompt=f"Tool {i} was invented by", target=f"Ada{i}") for i in range(3)]


def test_pack_casts_weights_keeps_normaliser_and_merges_card(tiny_llama, tmp_path) -> None:
    model, tok = tiny_llama
    editor = Editor.new(model, HyperConfig(rank=8))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in editor.nets.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=g))
    src = editor.save(tmp_path / "full.safetensors")
    (tmp_path / "extra.json").write_text(json.dumps({"command": "horse-ledger hypernet train ...", "metrics": {"es": 1}}))
    dst = tmp_path / "small.safetensors"
    result = CliRunner().invoke(hypernet, ["pack", str(src), str(dst), "--card", str(tmp_path / "extra.json")])
    assert result.exit_code == 0, result.output
    tensors, card = read_checkpoint(dst)
    assert card["command"].startswith("horse-ledger") and card["metrics"] == {"es": 1}
    for key, value in tensors.items():
        assert value.dtype == (torch.float64 if ".normaliser." in key else torch.bfloat16), key
    assert dst.stat().st_size < src.stat().st_size * 0.6
    small = Editor.from_checkpoint(dst, model)
    full_deltas, _ = Editor.from_checkpoint(src, model).compute_deltas(model, tok, REQUESTS)
    small_deltas, _ = small.compute_deltas(model, tok, REQUESTS)
    for name, d in full_deltas.items():
        a, b = d.to_dense(), small_deltas[name].to_dense()
        assert torch.allclose(a, b, rtol=0.1, atol=1e-3 * a.abs().max().item()), name


def test_pack_refuses_a_card_that_is_not_an_object(tiny_llama, tmp_path) -> None:
    model, _ = tiny_llama
    src = Editor.new(model, HyperConfig(rank=4)).save(tmp_path / "h.safetensors")
    (tmp_path / "bad.json").write_text("[1, 2]")
    result = CliRunner().invoke(hypernet, ["pack", str(src), str(tmp_path / "o.safetensors"), "--card",
                                           str(tmp_path / "bad.json")])
    assert result.exit_code != 0
    assert not (tmp_path / "o.safetensors").exists()
