"""horse/arch.py: module discovery and weight layouts for the GPT-2 (Conv1D) and Llama (Linear) families."""
from __future__ import annotations

import pytest
import torch

from horse.arch import (
    default_target_modules,
    delta_to_weight_layout,
    get_module,
    module_shape_KV,
    module_weight_KV,
    num_layers,
    weight_layout,
)
from horse.errors import EngineError


def test_gpt2_targets_and_layout(tiny_gpt2):
    model, _ = tiny_gpt2
    names = default_target_modules(model, n_last=2)
    assert names == ["transformer.h.4.mlp.c_proj", "transformer.h.5.mlp.c_proj"]
    module = get_module(model, names[0])
    assert weight_layout(module) == "in_out"
    assert module_shape_KV(module) == (256, 64)  # n_inner → n_embd
    assert module_weight_KV(module) is module.weight


def test_llama_targets_and_layout(tiny_llama):
    model, _ = tiny_llama
    names = default_target_modules(model)
    assert names == [f"model.layers.{i}.mlp.down_proj" for i in range(6)]  # min(6, n_layers)
    module = get_module(model, names[-1])
    assert weight_layout(module) == "out_in"
    assert module_shape_KV(module) == (128, 64)
    assert tuple(module.weight.shape) == (64, 128)
    assert module_weight_KV(module).data_ptr() == module.weight.data_ptr()


def test_block_range_targets(tiny_llama):
    from horse.arch import block_mlp_out_modules

    model, _ = tiny_llama
    assert block_mlp_out_modules(model, 1, 2) == ["model.layers.1.mlp.down_proj", "model.layers.2.mlp.down_proj"]
    with pytest.raises(EngineError, match="blocks 4-9 are outside this model's blocks 0-5"):
        block_mlp_out_modules(model, 4, 9)


def test_n_last_caps_at_layer_count(tiny_llama):
    model, _ = tiny_llama
    assert num_layers(model) == 6
    assert len(default_target_modules(model, n_last=100)) == 6
    with pytest.raises(EngineError):
        default_target_modules(model, n_last=0)


@pytest.mark.parametrize("fixture", ["tiny_gpt2", "tiny_llama"])
def test_weight_KV_view_matches_forward(fixture, request):
    """x @ W_KV + b must equal the module's own forward: that is what 'K×V' means."""
    model, _ = request.getfixturevalue(fixture)
    module = get_module(model, default_target_modules(model)[0])
    k, _ = module_shape_KV(module)
    x_NK = torch.randn(5, k)
    bias = module.bias if module.bias is not None else 0.0
    torch.testing.assert_close(module(x_NK), x_NK @ module_weight_KV(module) + bias)


@pytest.mark.parametrize("fixture", ["tiny_gpt2", "tiny_llama"])
def test_delta_layout(fixture, request):
    model, _ = request.getfixturevalue(fixture)
    module = get_module(model, default_target_modules(model)[0])
    k, v = module_shape_KV(module)
    delta_KV = torch.randn(k, v)
    assert delta_to_weight_layout(module, delta_KV).shape == module.weight.shape
    with pytest.raises(EngineError, match="another model"):
        delta_to_weight_layout(module, torch.zeros(v, k + 1))


def test_missing_module_is_refused(tiny_llama):
    model, _ = tiny_llama
    with pytest.raises(EngineError, match="does not exist"):
        get_module(model, "model.layers.99.mlp.down_proj")


def test_unsupported_architecture():
    with pytest.raises(EngineError, match="unsupported"):
        default_target_modules(torch.nn.Sequential(torch.nn.Linear(2, 2)))
