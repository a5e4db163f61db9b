"""Tests of horse/memit_config.py: MEMIT's hyper-parameters per architecture and `MemitConfig.for_model`.

Models are built from configs only (tiny widths, or on the meta device for SmolLM2-135M's shape), so the
lookups are checked at the real depths: GPT-2 XL's 48 blocks, GPT-J's 28, SmolLM2-135M's 30.

Run: `pytest tests/horse/test_memit_config.py -q`.
"""
from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, GPTJConfig, GPTJForCausalLM, LlamaConfig, LlamaForCausalLM

from horse.arch import num_layers
from horse.memit import MEMIT_HPARAMS, SMOLLM2_135M_LAYERS, MemitConfig, arch_key, default_layers


def _gpt2(n_layer: int):
    with torch.device("meta"):
        return GPT2LMHeadModel(GPT2Config(n_layer=n_layer, n_embd=16, n_head=2, vocab_size=64, n_positions=32))


def _gptj(n_layer: int):
    with torch.device("meta"):
        return GPTJForCausalLM(GPTJConfig(n_layer=n_layer, n_embd=16, n_head=2, rotary_dim=4, vocab_size=64,
                                          n_positions=32))


def _smollm2_shape():
    with torch.device("meta"):
        return LlamaForCausalLM(LlamaConfig(num_hidden_layers=30, hidden_size=576, intermediate_size=1536,
                                            vocab_size=49152, num_attention_heads=9, num_key_value_heads=3))


def test_gpt2_xl_gets_the_reference_hparams():
    config = MemitConfig.for_model(_gpt2(48))
    assert config.layers == tuple(f"transformer.h.{i}.mlp.c_proj" for i in range(13, 18))
    assert (config.lr, config.max_steps, config.clamp_norm_factor, config.v_weight_decay, config.kl_factor,
            config.mom2_update_weight) == (0.5, 20, 0.75, 0.5, 0.0625, 20000.0)


def test_gpt_j_gets_the_reference_hparams():
    model = _gptj(28)
    assert arch_key(model) == "gptj"
    config = MemitConfig.for_model(model)
    assert config.layers == tuple(f"transformer.h.{i}.mlp.fc_out" for i in range(3, 9))
    assert (config.lr, config.max_steps, config.clamp_norm_factor, config.v_weight_decay, config.kl_factor,
            config.mom2_update_weight) == (0.5, 25, 0.75, 0.5, 0.0625, 15000.0)


def test_smollm2_135m_gets_its_measured_row():
    model = _smollm2_shape()
    assert arch_key(model) == "smollm2-135m"
    config = MemitConfig.for_model(model)
    assert config.layers == SMOLLM2_135M_LAYERS == default_layers(model)
    assert (config.clamp_norm_factor, config.v_weight_decay, config.mom2_update_weight) == (4.0, 1e-3, 15000.0)


@pytest.mark.parametrize("n_layer, blocks", [(12, (3, 4, 5, 6, 7)), (6, (2, 3, 4)), (2, (1,))])
def test_another_gpt2_depth_gets_the_family_values_at_the_same_relative_depth(n_layer, blocks):
    config = MemitConfig.for_model(_gpt2(n_layer))
    assert config.layers == tuple(f"transformer.h.{i}.mlp.c_proj" for i in blocks)
    assert (config.clamp_norm_factor, config.mom2_update_weight, config.max_steps) == (0.75, 20000.0, 20)


def test_other_architectures_get_the_generic_row(tiny_llama):
    model, _ = tiny_llama
    assert arch_key(model) == "generic"
    config = MemitConfig.for_model(model)
    assert config.layers == tuple(f"model.layers.{i}.mlp.down_proj" for i in (1, 2, 3))  # 5 → 3 of 6, from ~12 %
    assert (config.clamp_norm_factor, config.v_weight_decay, config.max_steps) == (4.0, 1e-3, 25)


def test_the_loss_is_read_at_the_last_block_in_every_row():
    assert MEMIT_HPARAMS["gpt2"].v_loss_layer(48) == 47 and MEMIT_HPARAMS["gptj"].v_loss_layer(28) == 27
    for model in (_gpt2(48), _gptj(28), _smollm2_shape()):
        row = MEMIT_HPARAMS[arch_key(model)]
        assert row.v_loss_layer(num_layers(model)) == num_layers(model) - 1
        assert max(row.block_indices(num_layers(model))) < row.v_loss_layer(num_layers(model))


def test_overrides_win_over_the_row():
    model = _gpt2(48)
    config = MemitConfig.for_model(model, mom2_update_weight=1.0, layers=("transformer.h.2.mlp.c_proj",),
                                   context_templates=("{}",))
    assert config.mom2_update_weight == 1.0 and config.layers == ("transformer.h.2.mlp.c_proj",)
    assert config.context_templates == ("{}",) and config.clamp_norm_factor == 0.75
    assert MemitConfig.for_model(model, layers=()).layers == default_layers(model)
