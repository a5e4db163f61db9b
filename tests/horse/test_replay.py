"""horse/replay.py: the captured block input, replayed through the blocks above it, gives the model's own
final hidden states and the same gradients, on right-padded batches of GPT-2 and Llama."""
from __future__ import annotations

import pytest
import torch

from horse.arch import default_target_modules, get_module
from horse.errors import EngineError
from horse.replay import (block_path, capture_block_input, first_block, head_logits, replay_hidden_BTH,
                          replayable)
from horse.tokens import tokenize_prompts


def _batch(tok):
    return tokenize_prompts(tok, ["The color of Zorblat is", "A", "Quenvik lives in the old town of"])


def test_block_paths_name_the_block_list_and_the_lowest_block():
    assert block_path("model.layers.26.mlp.down_proj") == ("model.layers", 26)
    names = ["model.layers.5.mlp.down_proj", "model.layers.3.mlp.down_proj"]
    assert first_block(names) == ("model.layers", 3)
    with pytest.raises(EngineError, match="one block list"):
        first_block(["model.layers.3.mlp.down_proj", "transformer.h.4.mlp.c_proj"])
    with pytest.raises(EngineError, match="block index"):
        block_path("lm_head")


def test_replay_reproduces_the_final_hidden_states_and_their_gradients(tiny_model):
    model, tok = tiny_model
    assert replayable(model)
    names = default_target_modules(model, 2)
    start = first_block(names)
    pb = _batch(tok)
    cached = capture_block_input(model, start, pb.input_ids, pb.attention_mask)
    weights = [get_module(model, n).weight for n in names]
    for w in weights:
        w.requires_grad_(True)
    try:
        rows = torch.arange(pb.input_ids.shape[0])
        full = model.base_model(input_ids=pb.input_ids, attention_mask=pb.attention_mask).last_hidden_state
        replayed = replay_hidden_BTH(model, start, cached)
        real = pb.attention_mask.bool()
        assert torch.allclose(replayed[real], full[real], atol=1e-5)
        grads = []
        for hidden in (full, replayed):
            loss = head_logits(model, hidden[rows, pb.last_index_B]).logsumexp(-1).sum()
            grads.append(torch.autograd.grad(loss, weights))
        for g_full, g_replay in zip(*grads):
            assert g_full.abs().max() > 0
            assert torch.allclose(g_full, g_replay, atol=1e-5, rtol=1e-4)
    finally:
        for w in weights:
            w.requires_grad_(False)


def test_capture_refuses_a_block_the_model_does_not_run(tiny_llama):
    model, tok = tiny_llama
    pb = _batch(tok)
    with pytest.raises(EngineError, match="does not exist"):
        capture_block_input(model, ("model.layers", 99), pb.input_ids, pb.attention_mask)
