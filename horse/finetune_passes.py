"""What fine-tune-the-ledger (`horse.finetune`) runs its forwards on: the prompts it picks and the fixed passes.

The prompts: `locality_prompts` (fixed unrelated text from the local corpus, never the gate's canary),
`subject_swaps` (each edit's prompt asked of another edit's subject) and `rehearsal_subset` (which edits a warm
start trains). The passes: a `Pass` is one fixed forward (token ids, the N positions it scores, the first trained
block's input once cached), built by `edit_pass` (the answer tokens of edits) or `prompt_pass` (the next token
after each prompt); `pass_logits_NW` runs it (replayed above the cached block when there is one), `top_k` keeps
the base model's most likely next tokens and `pass_accuracy` scores edit passes with deltas added.

Dimension key: B rows (prompts) of T positions, N scored positions, W vocabulary.
Tests: `python -m pytest tests/horse/test_finetune.py -q`.
"""
from __future__ import annotations

import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from horse.deltas import LayerDelta, apply_deltas
from horse.finetune_losses import answer_accuracy_B
from horse.metrics import logits_at
from horse.replay import BlockInput, head_logits, replay_hidden_BTH
from horse.tokens import PromptBatch, TokenizedBatch
from horse.types import EditRequest


def subject_swaps(requests: Sequence[EditRequest], seed: int) -> list[str | None]:
    """Per edit, its prompt asked of another edit's subject (None where none fits): the subject must appear in
    the prompt, the other subject differs from it, and the swapped prompt must not itself be an edited prompt
    (whose answer is meant to change). Deterministic for a given seed."""
    edited = {r.prompt for r in requests}
    subjects = sorted({r.subject for r in requests if r.subject})
    rng = random.Random(seed)
    out: list[str | None] = []
    for r in requests:
        swapped = None
        if r.subject and r.subject in r.prompt and len(subjects) > 1:
            for other in rng.sample(subjects, min(4, len(subjects))):
                prompt = r.prompt.replace(r.subject, other, 1)
                if other != r.subject and prompt not in edited:
                    swapped = prompt
                    break
        out.append(swapped)
    return out


def rehearsal_subset(recalled_N: Sequence[bool], rehearsal: float, seed: int, keep: Iterable[int] = ()) -> list[int]:
    """What a warm start trains on, as indices into the N edits: every edit not recalled and every index in
    `keep` (those an earlier round found forgotten), and round(rehearsal × their number) other recalled ones drawn
    at random (all of them when there are fewer), in index order. Empty when every edit is recalled.
    Deterministic for a given seed."""
    if all(recalled_N):
        return []
    fragile = {i for i, ok in enumerate(recalled_N) if not ok} | set(keep)
    others = [i for i, ok in enumerate(recalled_N) if ok and i not in fragile]
    n_rehearse = min(len(others), round(rehearsal * len(fragile)))
    return sorted(fragile | set(random.Random(seed).sample(others, n_rehearse)))


def locality_prompts(n: int, seed: int, held_out: frozenset[str] = frozenset()) -> list[str]:
    """`n` fixed unrelated prompts from the local corpus (the same text the covariance statistics use), none of
    them in `held_out` (the gate's canary prompts: what measures locality is never trained on)."""
    from horse.covariance import corpus_texts

    texts = sorted({t.strip() for t in corpus_texts() if t and t.strip()} - held_out)
    return random.Random(seed).sample(texts, min(n, len(texts)))


@dataclass
class Pass:
    """One fixed forward of the training: its token ids, the positions it scores (N), and the input of the
    first trained block captured once (None: every step runs the whole model)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    rows_N: torch.Tensor
    cols_N: torch.Tensor
    targets_N: torch.Tensor | None = None   # answer tokens (edit passes); None for next-token prompts
    cached: BlockInput | None = None

    @property
    def n_rows(self) -> int:
        return int(self.input_ids.shape[0])


def edit_pass(batch: TokenizedBatch) -> Pass:
    """The pass over edits' prompt → answer: it scores the answer tokens (targets_N)."""
    rows_N, cols_N = batch.answer_positions()
    return Pass(batch.input_ids, batch.attention_mask, rows_N, cols_N, batch.labels[rows_N, cols_N])


def prompt_pass(batch: PromptBatch) -> Pass:
    """The pass over plain prompts: it scores the next token after each prompt's last real token."""
    rows_N = torch.arange(batch.input_ids.shape[0], device=batch.input_ids.device)
    return Pass(batch.input_ids, batch.attention_mask, rows_N, batch.last_index_B)


def pass_logits_NW(model: nn.Module, start: tuple[str, int] | None, p: Pass) -> torch.Tensor:
    """Logits at the pass's scored positions, N×W fp32, from the cached block input when there is one."""
    if p.cached is None:
        return logits_at(model, p.input_ids, p.attention_mask, p.rows_N, p.cols_N)
    return head_logits(model, replay_hidden_BTH(model, start, p.cached)[p.rows_N, p.cols_N])


def top_k(model: nn.Module, start: tuple[str, int] | None, p: Pass, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's k most likely next tokens at the pass's scored positions: (ids N×k, log-probs N×k)."""
    logp_NW = torch.log_softmax(pass_logits_NW(model, start, p), dim=-1)
    top = logp_NW.topk(min(k, logp_NW.shape[-1]), dim=-1)
    return top.indices, top.values


def pass_accuracy(model: nn.Module, start: tuple[str, int] | None, passes: Sequence[Pass],
                  deltas: Mapping[str, LayerDelta]) -> list[float]:
    """Per row of the edit passes, in order: the answer-token accuracy (teacher-forced) of the model with
    `deltas` added, from the cached block inputs when there are some. An edit is recalled at 1.0."""
    accuracy: list[float] = []
    with torch.no_grad(), apply_deltas(model, deltas):
        for p in passes:
            accuracy += answer_accuracy_B(pass_logits_NW(model, start, p), p.targets_N, p.rows_N, p.n_rows).tolist()
    return accuracy
