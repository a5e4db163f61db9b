"""Run a causal LM from a block on: capture the input of a block once, replay only the blocks above it.

When only the modules of the last blocks change (what every engine here edits), the hidden state that enters
the first of those blocks is the same on every pass over the same batch. An optimisation that runs the same
batches many times (MEMIT's z vectors, fine-tune-the-ledger's epochs) captures that input, with the positional
arguments the block was called with (rotary embeddings, attention mask), in one forward pass, and then runs
only the blocks from there, the final norm and the LM head (at the positions it scores):

    start = first_block(model, module_names)                   # ("model.layers", 24)
    cached = capture_block_input(model, start, batch.input_ids, batch.attention_mask)   # no grad
    hidden_BTH = replay_hidden_BTH(model, start, cached)      # = base(...).last_hidden_state, graph attached
    logits_NW = head_logits(model, hidden_BTH[rows_N, cols_N])

`replayable(model)` says whether the model's head is a plain linear map of the normed final hidden state (no
logit scaling or soft-capping); callers fall back to full forward passes otherwise.

Dimension key: B batch, T positions, H hidden width, N gathered positions, W vocabulary.
Tests: `python -m pytest tests/horse/test_replay.py -q`.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from horse.arch import get_module
from horse.errors import EngineError

# configs whose head does more than a linear map of the final hidden state
HEAD_EXTRAS = ("final_logit_softcapping", "logit_scale", "output_multiplier_scale", "logits_scaling")


def block_path(layer: str) -> tuple[str, int]:
    """("model.layers", 26) for "model.layers.26.mlp.down_proj": the block list and the block index."""
    parts = layer.split(".")
    for j in range(len(parts) - 1, -1, -1):
        if parts[j].isdigit():
            return ".".join(parts[:j]), int(parts[j])
    raise EngineError(f"cannot find the block index in layer path {layer!r}; give HF paths like "
                      "'model.layers.5.mlp.down_proj'")


def first_block(module_names: Sequence[str]) -> tuple[str, int]:
    """The block list and the lowest block index holding one of `module_names` (all in one block list)."""
    paths = [block_path(n) for n in module_names]
    if not paths or len({p for p, _ in paths}) != 1:
        raise EngineError(f"modules {list(module_names)} are not all in one block list; give the MLP output "
                          "linears of one model's blocks")
    return paths[0][0], min(i for _, i in paths)


def first(out: object) -> torch.Tensor:
    """A block's hidden-state output (blocks return a tensor or a tuple starting with it)."""
    return out[0] if isinstance(out, (tuple, list)) else out  # type: ignore[return-value]


def final_norm(base: nn.Module) -> nn.Module | None:
    """The norm after the last block of a base model (Llama `norm`, GPT-2 `ln_f`, …); None when unknown."""
    for name in ("norm", "ln_f", "final_layer_norm", "final_layernorm"):
        mod = getattr(base, name, None)
        if isinstance(mod, nn.Module):
            return mod
    return None


def head_is_linear(model: nn.Module) -> bool:
    """True unless the model's config scales or soft-caps its logits (`HEAD_EXTRAS`)."""
    config = getattr(model, "config", None)
    return not any(getattr(config, k, None) not in (None, 1, 1.0) for k in HEAD_EXTRAS)


def replayable(model: nn.Module) -> bool:
    """True when logits = lm_head(final_norm(last block's output)): the replay reproduces the model."""
    base = getattr(model, "base_model", None)
    return (base is not None and base is not model and final_norm(base) is not None
            and model.get_output_embeddings() is not None and head_is_linear(model))


def head_logits(model: nn.Module, hidden_NH: torch.Tensor) -> torch.Tensor:
    """N×W fp32 logits of final hidden states (already normed)."""
    return model.get_output_embeddings()(hidden_NH).float()


@dataclass
class BlockInput:
    """What entered block `start` during one forward pass: the hidden state and the block's other arguments."""

    hidden_BTH: torch.Tensor
    args: tuple
    kwargs: dict[str, Any]


class _Captured(Exception):
    """Raised by the capture hook to stop the forward pass once the block input is recorded."""


@torch.no_grad()
def capture_block_input(model: nn.Module, start: tuple[str, int], input_ids_BT: torch.Tensor,
                        attention_mask_BT: torch.Tensor) -> BlockInput:
    """Run the model up to block `start` (a `first_block` result) and return that block's input; the blocks
    from `start` on and the head do not run."""
    blocks_path, index = start
    blocks = get_module(model, blocks_path)
    if not 0 <= index < len(blocks):
        raise EngineError(f"block {blocks_path}.{index} does not exist ({len(blocks)} blocks); the module names do "
                          "not belong to this model")
    block = blocks[index]
    got: list[BlockInput] = []

    def grab(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        got.append(BlockInput(hidden.detach(), tuple(args[1:]),
                              {k: v for k, v in kwargs.items() if k != "hidden_states"}))
        raise _Captured

    handle = block.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        model.base_model(input_ids=input_ids_BT, attention_mask=attention_mask_BT, use_cache=False)
    except _Captured:
        pass
    finally:
        handle.remove()
    if not got:
        raise EngineError(f"block {blocks_path}.{index} did not run in the forward pass; the module names do "
                          "not belong to this model")
    return got[0]


def outside_blocks(model: nn.Module, start: tuple[str, int]) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of `model` (by name) outside the blocks from `start` on: what a block input
    captured at `start` and the replay's final norm and head depend on."""
    blocks_path, index = start
    above = tuple(f"{blocks_path}.{i}." for i in range(index, len(get_module(model, blocks_path))))
    return {n: t for named in (model.named_parameters(), model.named_buffers()) for n, t in named
            if not n.startswith(above)}


def prefix_matches(model: nn.Module, reference: nn.Module, start: tuple[str, int]) -> bool:
    """True when every parameter and buffer of `model` outside the blocks from `start` on equals `reference`'s
    (same names, shapes and values): then a block input captured on `reference` is `model`'s too, and replaying
    it on `model` gives `model`'s own outputs (its final norm and head are compared as well)."""
    mine, theirs = outside_blocks(model, start), outside_blocks(reference, start)
    return mine.keys() == theirs.keys() and all(
        mine[n].shape == theirs[n].shape and torch.equal(mine[n], theirs[n].to(mine[n].device)) for n in mine)


def replay_hidden_BTH(model: nn.Module, start: tuple[str, int], cached: BlockInput) -> torch.Tensor:
    """The final, normed hidden states B×T×H of the pass `cached` came from, running only the blocks from
    `start` on with the model's current weights (gradients flow into them)."""
    blocks_path, index = start
    hidden = cached.hidden_BTH
    for block in get_module(model, blocks_path)[index:]:
        hidden = first(block(hidden, *cached.args, **cached.kwargs))
    return final_norm(model.base_model)(hidden)  # type: ignore[misc]
