"""Module paths and weight layouts per architecture (the engine's only architecture-specific code).

Owns: which modules the editor touches by default (the MLP output linear of the last layers), how to
find a module by its HF path, and how each module stores its weight. Every delta in the engine is
expressed as `delta_KV` (K = d_k = module input width, V = d_v = module output width); this file says
how a `delta_KV` maps onto a module's stored weight:

- GPT-2 `Conv1D` stores `weight` as (in, out) = K×V: the delta adds as is.
- `nn.Linear` (GPT-J, Llama, Mistral, SmolLM2) stores `weight` as (out, in) = V×K: the delta adds transposed.

Run the tests with `pytest tests/horse/test_arch.py`.
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from horse.errors import EngineError

Layout = Literal["in_out", "out_in"]

# (path of the ModuleList holding the blocks, path of the MLP output linear inside one block)
_MLP_OUT_PATTERNS: tuple[tuple[str, str], ...] = (
    ("transformer.h", "mlp.c_proj"),  # GPT-2 (Conv1D, in×out)
    ("transformer.h", "mlp.fc_out"),  # GPT-J (Linear, out×in)
    ("model.layers", "mlp.down_proj"),  # Llama / Mistral / Qwen / SmolLM2 (Linear, out×in)
    ("gpt_neox.layers", "mlp.dense_4h_to_h"),  # GPT-NeoX / Pythia (Linear, out×in)
)


def get_module(model: nn.Module, name: str) -> nn.Module:
    """Return the submodule at HF path `name` (e.g. "model.layers.26.mlp.down_proj").

    Raises:
        EngineError: when the path does not exist in this model.
    """
    try:
        return model.get_submodule(name)
    except AttributeError as exc:
        raise EngineError(
            f"module {name!r} does not exist in {type(model).__name__}; "
            "list the model's modules with model.named_modules() and pass existing paths"
        ) from exc


def _maybe_module(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def num_layers(model: nn.Module) -> int:
    """Number of transformer blocks of a supported architecture."""
    for blocks_path, _ in _MLP_OUT_PATTERNS:
        blocks = _maybe_module(model, blocks_path)
        if isinstance(blocks, nn.ModuleList):
            return len(blocks)
    raise EngineError(
        f"unsupported architecture {type(model).__name__}: no transformer.h / model.layers / "
        "gpt_neox.layers block list; pass the target module names explicitly"
    )


def default_target_modules(model: nn.Module, n_last: int = 6) -> list[str]:
    """HF paths of the MLP output linears of the last min(n_last, n_layers) blocks, ascending.

    Args:
        model: a causal LM (GPT-2, GPT-J, Llama-family, GPT-NeoX).
        n_last: how many of the last blocks to edit.

    Returns:
        e.g. ["model.layers.24.mlp.down_proj", …, "model.layers.29.mlp.down_proj"].

    Raises:
        EngineError: for an architecture this file does not know.
    """
    if n_last < 1:
        raise EngineError(f"n_last must be at least 1, got {n_last}")
    for blocks_path, mlp_out in _MLP_OUT_PATTERNS:
        blocks = _maybe_module(model, blocks_path)
        if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
            continue
        if _maybe_module(blocks[0], mlp_out) is None:
            continue
        n_layers = len(blocks)
        first = n_layers - min(n_last, n_layers)
        return [f"{blocks_path}.{i}.{mlp_out}" for i in range(first, n_layers)]
    raise EngineError(
        f"unsupported architecture {type(model).__name__}: no known MLP output module "
        "(mlp.c_proj, mlp.fc_out, mlp.down_proj, mlp.dense_4h_to_h); pass the target module names explicitly"
    )


def block_mlp_out_modules(model: nn.Module, first: int, last: int) -> list[str]:
    """HF paths of the MLP output linears of blocks first..last (inclusive), ascending: where to fine-tune
    when not the last six (e.g. the mid blocks MEMIT edits, where a fact is written at its subject's tokens).

    Raises:
        EngineError: blocks outside the model, or an architecture this file does not know.
    """
    every = default_target_modules(model, 1 << 30)
    if not 0 <= first <= last < len(every):
        raise EngineError(f"blocks {first}-{last} are outside this model's blocks 0-{len(every) - 1}; "
                          f"give a range inside them (finetune_blocks in the config)")
    return every[first:last + 1]


def weight_layout(module: nn.Module) -> Layout:
    """"in_out" when `module.weight` is stored K×V (GPT-2 Conv1D), "out_in" when V×K (nn.Linear)."""
    if isinstance(module, nn.Linear):
        return "out_in"
    # transformers' Conv1D (GPT-2): y = x @ W + b with W (nx, nf) = (in, out). Matched by name so that
    # this file does not depend on where transformers keeps the class.
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        return "in_out"
    raise EngineError(
        f"unsupported module type {type(module).__name__}: only nn.Linear and GPT-2 Conv1D can be edited"
    )


def module_shape_KV(module: nn.Module) -> tuple[int, int]:
    """(K, V) = (d_k input width, d_v output width) of an editable module."""
    weight = module.weight
    if weight_layout(module) == "in_out":
        return int(weight.shape[0]), int(weight.shape[1])
    return int(weight.shape[1]), int(weight.shape[0])


def module_weight_KV(module: nn.Module) -> torch.Tensor:
    """The module's weight seen as K×V (in × out): the tensor itself or a transposed view (no copy).

    Writing into the returned view writes the module's weight.
    """
    weight = module.weight
    return weight if weight_layout(module) == "in_out" else weight.t()


def delta_to_weight_layout(module: nn.Module, delta_KV: torch.Tensor) -> torch.Tensor:
    """Express a K×V delta in the module's stored layout (transposed for nn.Linear)."""
    k, v = module_shape_KV(module)
    if tuple(delta_KV.shape) != (k, v):
        raise EngineError(
            f"delta shape {tuple(delta_KV.shape)} does not fit module of shape (K={k}, V={v}); "
            "the deltas were computed for another model"
        )
    return delta_KV if weight_layout(module) == "in_out" else delta_KV.t()


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's (first) parameters."""
    return next(model.parameters()).device
