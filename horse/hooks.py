"""Capture of keys and output gradients at the answer tokens (paper step 3), and the answer-only LM loss.

Owns the forward hooks of the editor. They live only inside context managers that remove every handle
on exit (also on error), so no hook outlives a call. For each target module l they record
- K^l (N×K): the module's input at the answer positions,
- G^l (N×V): the gradient of the mini-batch's mean answer cross-entropy with respect to the module's output
  at the answer positions,
in at least float32 (a bf16 model is fine; the math is fp32).

Two speed choices (REFERENCE_RESULTS.md, "The floor for one edit"): the LM head is applied only at the
answer positions (hidden states gathered first), and G is taken with `torch.autograd.grad` with respect to
the module outputs, so no parameter gradient is computed and the backward stops at the first edited layer.

It also owns `delta_hooks`, which runs the model as the edited model W + ΔW without writing any weight
(meta-training's edited forward pass: autograd then gives Γ = ∂L/∂ΔW directly, in ΔW's precision).

Dimension key: B batch, T positions, N answer tokens, K = d_k, V = d_v, H hidden width.
Tests: `python -m pytest tests/horse/test_hooks.py -q`.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from horse.arch import get_module
from horse.replay import head_is_linear
from horse.solve import math_dtype


@dataclass
class LayerCapture:
    """What one target module recorded: lists of per-mini-batch tensors."""

    keys_NK: list[torch.Tensor] = field(default_factory=list)
    outputs_BTV: list[torch.Tensor] = field(default_factory=list)
    grads_NV: list[torch.Tensor] = field(default_factory=list)


@contextmanager
def frozen_parameters(model: nn.Module) -> Iterator[None]:
    """Turn off requires_grad on every parameter for the block; the old flags are restored on exit."""
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


@contextmanager
def record_keys(
    model: nn.Module, module_names: Sequence[str], answer_mask_BT: torch.Tensor, *, keep_outputs: bool
) -> Iterator[dict[str, LayerCapture]]:
    """Forward hooks that record each module's input at the answer positions (and, optionally, its output).

    Args:
        model: the LM.
        module_names: HF paths of the target modules.
        answer_mask_BT: bool mask of the answer positions of the next forward pass.
        keep_outputs: also keep the full output tensor (graph attached) so its gradient can be taken; an
            output that does not require grad (frozen model, first edited layer) is made a grad-requiring leaf.

    Yields:
        module name → LayerCapture, filled during the forward pass. Handles are removed on exit.
    """
    captures = {name: LayerCapture() for name in module_names}
    handles = []

    def make_hook(name: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor):
            inp = args[0]
            captures[name].keys_NK.append(inp.detach()[answer_mask_BT].to(math_dtype(inp)))
            if keep_outputs:
                if not output.requires_grad:
                    output = output.detach().requires_grad_(True)
                captures[name].outputs_BTV.append(output)
                return output
            return None

        return hook

    try:
        for name in module_names:
            handles.append(get_module(model, name).register_forward_hook(make_hook(name)))
        yield captures
    finally:
        for h in handles:
            h.remove()


def answer_logits(
    model: nn.Module, input_ids_BT: torch.Tensor, attention_mask_BT: torch.Tensor, answer_mask_BT: torch.Tensor
) -> torch.Tensor:
    """Logits (N×vocab) at the answer positions only.

    The base model runs over every position, the hidden states at the answer positions are gathered, and
    only those go through the LM head. Models whose head is more than a linear map (logit soft-capping or
    scaling) fall back to full logits, then gather.
    """
    base = getattr(model, "base_model", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if base is not None and base is not model and head is not None and head_is_linear(model):
        hidden_BTH = base(input_ids=input_ids_BT, attention_mask=attention_mask_BT).last_hidden_state
        return head(hidden_BTH[answer_mask_BT])
    logits_BTX = model(input_ids=input_ids_BT, attention_mask=attention_mask_BT).logits
    return logits_BTX[answer_mask_BT]


def answer_ce(
    model: nn.Module, input_ids_BT: torch.Tensor, attention_mask_BT: torch.Tensor, labels_BT: torch.Tensor
) -> torch.Tensor:
    """Mean cross-entropy over the answer tokens (labels ≠ −100, already shifted), in fp32."""
    mask_BT = labels_BT != -100
    logits_NX = answer_logits(model, input_ids_BT, attention_mask_BT, mask_BT)
    return F.cross_entropy(logits_NX.float(), labels_BT[mask_BT])


@dataclass
class Captured:
    """Keys and gradients of one capture pass, per target module, rows in batch order."""

    keys_NK: dict[str, torch.Tensor]
    grads_NV: dict[str, torch.Tensor]
    loss_per_batch: list[float]

    @property
    def n_tokens(self) -> int:
        return next(iter(self.keys_NK.values())).shape[0] if self.keys_NK else 0


def capture_batch(
    model: nn.Module, module_names: Sequence[str], input_ids_BT: torch.Tensor, attention_mask_BT: torch.Tensor,
    labels_BT: torch.Tensor,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], float]:
    """One LM mini-batch: forward, mean answer CE, gradients with respect to the module outputs.

    Returns:
        (keys_NK per module, grads_NV per module, loss value), fp32 or wider.
    """
    mask_BT = labels_BT != -100
    with frozen_parameters(model), torch.enable_grad():
        with record_keys(model, module_names, mask_BT, keep_outputs=True) as caps:
            loss = answer_ce(model, input_ids_BT, attention_mask_BT, labels_BT)
        outputs = [caps[name].outputs_BTV[-1] for name in module_names]
        grads_BTV = torch.autograd.grad(loss, outputs, allow_unused=True)
    keys = {name: caps[name].keys_NK[-1] for name in module_names}
    grads = {}
    for name, out, g in zip(module_names, outputs, grads_BTV):
        g = torch.zeros_like(out) if g is None else g
        grads[name] = g[mask_BT].to(math_dtype(g))
    return keys, grads, float(loss.detach())


def capture(
    model: nn.Module, module_names: Sequence[str], batches: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
) -> Captured:
    """Capture K^l and G^l over LM mini-batches (each gradient is of its own mini-batch's mean CE, as MALMEN).

    Args:
        model: the LM in eval mode (dropout off), on its device.
        module_names: the target modules.
        batches: (input_ids_BT, attention_mask_BT, labels_BT) per mini-batch, on the model's device.

    Returns:
        Captured with the rows of every mini-batch concatenated in order.
    """
    keys: dict[str, list[torch.Tensor]] = {n: [] for n in module_names}
    grads: dict[str, list[torch.Tensor]] = {n: [] for n in module_names}
    losses = []
    for input_ids, attention_mask, labels in batches:
        k, g, loss = capture_batch(model, module_names, input_ids, attention_mask, labels)
        losses.append(loss)
        for name in module_names:
            keys[name].append(k[name])
            grads[name].append(g[name])
    return Captured(
        keys_NK={n: torch.cat(v) for n, v in keys.items()},
        grads_NV={n: torch.cat(v) for n, v in grads.items()},
        loss_per_batch=losses,
    )


def capture_keys(
    model: nn.Module, module_names: Sequence[str], batches: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
) -> dict[str, torch.Tensor]:
    """K^l alone over LM mini-batches (as `capture`, without the backward pass for the gradients): one forward
    per mini-batch under no_grad. Returns keys_NK per module, rows of every mini-batch in order."""
    keys: dict[str, list[torch.Tensor]] = {n: [] for n in module_names}
    with torch.no_grad():
        for input_ids, attention_mask, labels in batches:
            mask_BT = labels != -100
            with record_keys(model, module_names, mask_BT, keep_outputs=False) as caps:
                answer_logits(model, input_ids, attention_mask, mask_BT)
            for name in module_names:
                keys[name].append(caps[name].keys_NK[-1])
    return {n: torch.cat(v) for n, v in keys.items()}


@contextmanager
def delta_hooks(model: nn.Module, deltas_KV: dict[str, torch.Tensor]) -> Iterator[None]:
    """Run the model as if W^l ← W^l + ΔW^l, without touching any weight (meta-training's edited model).

    Each target module's output gets `input @ ΔW_KV` added (x(W + Δ) = xW + xΔ), computed in ΔW's dtype and
    cast to the output's. When ΔW_KV requires grad, autograd gives Γ^l = ∂L/∂ΔW^l = ∂L/∂W^l at the edited
    weights (K×V) — what the two-stage meta-gradient needs — with no parameter gradient of the LM.
    Handles are removed on exit.
    """
    handles = []

    def make_hook(delta_KV: torch.Tensor):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            extra = args[0].to(delta_KV.dtype) @ delta_KV
            return output + extra.to(output.dtype)

        return hook

    try:
        for name, delta in deltas_KV.items():
            handles.append(get_module(model, name).register_forward_hook(make_hook(delta)))
        yield
    finally:
        for h in handles:
            h.remove()
