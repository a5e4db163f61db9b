"""LM mini-batches for the editor's passes over the model, and eval mode for those passes.

`lm_batches` tokenises (prompt, answer) pairs into (input_ids_BT, attention_mask_BT, labels_BT) mini-batches on
a device (labels: the answer token to predict after each position, −100 elsewhere; `horse.tokens.tokenize_pairs`);
`request_batches` does it for edit requests (prompt → new target): what the Editor's capture passes run on.
`eval_mode` turns dropout off for a block and restores the model's mode.

Tests: `python -m pytest tests/horse/test_editor.py -q`.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from horse.arch import model_device
from horse.errors import EngineError
from horse.tokens import TokenizedBatch, chunked, tokenize_pairs
from horse.types import EditRequest


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Put the model in eval mode (dropout off) for the block and restore its previous mode."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def lm_batches(
    tok: PreTrainedTokenizerBase, prompts: Sequence[str], answers: Sequence[str], batch_size: int,
    device: torch.device,
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(input_ids, attention_mask, labels) per LM mini-batch of `batch_size` pairs, on `device`."""
    out = []
    for idx in chunked(list(range(len(prompts))), batch_size):
        b: TokenizedBatch = tokenize_pairs(tok, [prompts[i] for i in idx], [answers[i] for i in idx]).to(device)
        out.append((b.input_ids, b.attention_mask, b.labels))
    return out


def request_batches(model: nn.Module, tokenizer: PreTrainedTokenizerBase, requests: Sequence[EditRequest],
                    lm_batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """`lm_batches` of the requests' prompts → new targets on the model's device (refuses none)."""
    if not requests:
        raise EngineError("no requests to edit; give at least one EditRequest")
    return lm_batches(tokenizer, [r.prompt for r in requests], [r.target for r in requests], lm_batch_size,
                      model_device(model))
