"""Tokenisation of (prompt, answer) pairs for capture, metrics and MEMIT: one rule, used everywhere.

Owns the layout of an edit's tokens (issue 3, step 2). For one pair:

    context = tokens(prompt.rstrip())               # with the tokenizer's own special tokens (BOS if it adds one)
    answer  = tokens(" " + answer.strip())          # no special tokens
    input   = context ⧺ answer[:-1]
    labels  = -100 on the context except its last position, then the answer tokens (already shifted),
              so labels[t] is the token the model must predict after input[t].

Lone-space rule. Many tokenizers split " " + answer into a lone whitespace token and the rest: SmolLM2
(and GPT-2) give " 2006" = ["Ġ", "2", "0", "0", "6"] (digits are split, the space stays alone), SentencePiece
Llama tokenizers can give ["▁", "▁Paris"], and the tiny byte-level test tokenizer does it for every answer.
Such a token is trivially predicted and inflates accuracy and probability scores, so: when the FIRST answer
token decodes to whitespace only and other answer tokens follow, it is moved into the context — the model
still sees it as input (exactly the tokens of running text "… was 2006") but it is never a label, never
scored, never edited towards. On SmolLM2, word answers (" Paris" = ["ĠParis"]) are unaffected; numbers and
answers starting with a digit or symbol lose the lone "Ġ".

Batches are right-padded (pad id, attention 0, label -100). Dimension key: B requests, T positions,
N answer tokens in the batch (one row per labelled position, row-major: request, then position).

Run the tests with `pytest tests/horse/test_tokens.py`.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
from transformers import PreTrainedTokenizerBase

from horse.errors import EngineError
from horse.types import EditRequest

IGNORE_INDEX = -100
T = TypeVar("T")


@dataclass(frozen=True)
class TokenizedBatch:
    """Padded teacher-forcing batch.

    Attributes:
        input_ids: B×T long, right-padded with the pad id.
        attention_mask: B×T long, 1 on real tokens.
        labels: B×T long, the answer token to predict after each position, -100 elsewhere.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor

    def to(self, device: str | torch.device) -> TokenizedBatch:
        """The same batch on `device`."""
        return TokenizedBatch(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device))

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """Keyword arguments for `model(**...)` (no labels: the engine computes its own losses)."""
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask}

    @property
    def answer_mask(self) -> torch.Tensor:
        """B×T bool: True where a label is set."""
        return self.labels != IGNORE_INDEX

    @property
    def n_tokens(self) -> int:
        """N, the number of answer tokens in the batch."""
        return int(self.answer_mask.sum())

    def answer_positions(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(request_N, position_N): where the N answer tokens are predicted, row-major."""
        return answer_positions(self.labels)

    def answer_targets_N(self) -> torch.Tensor:
        """N long: the answer token ids, in the order of `answer_positions`."""
        return self.labels[self.answer_mask]

    def answer_lengths_B(self) -> torch.Tensor:
        """B long: number of answer tokens per request."""
        return self.answer_mask.sum(dim=1)


@dataclass(frozen=True)
class PromptBatch:
    """Right-padded prompts for next-token prediction and greedy decoding.

    Attributes:
        input_ids: B×T long.
        attention_mask: B×T long.
        last_index_B: B long, the position of each prompt's last real token.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    last_index_B: torch.Tensor

    def to(self, device: str | torch.device) -> PromptBatch:
        return PromptBatch(self.input_ids.to(device), self.attention_mask.to(device), self.last_index_B.to(device))


def answer_positions(labels_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(request_N, position_N) of the labelled positions, row-major (request, then position)."""
    request_N, position_N = (labels_BT != IGNORE_INDEX).nonzero(as_tuple=True)
    return request_N, position_N


def _is_lone_space(tok: PreTrainedTokenizerBase, token_id: int) -> bool:
    piece = tok.convert_ids_to_tokens(token_id)
    if piece in ("▁", "Ġ", " "):
        return True
    return tok.decode([token_id]).strip() == "" and piece not in tok.all_special_tokens


def split_answer(tok: PreTrainedTokenizerBase, answer: str) -> tuple[list[int], list[int]]:
    """Tokens of " " + answer, split into (lead_ids moved to the context, scored answer_ids).

    Args:
        tok: the model's tokenizer.
        answer: the answer text without a leading space (surrounding whitespace is stripped).

    Returns:
        (lead_ids, answer_ids): lead_ids is [] or one lone-space token (see the module docstring);
        answer_ids has at least one token.

    Raises:
        EngineError: for an empty answer.
    """
    text = answer.strip()
    if not text:
        raise EngineError(f"empty answer {answer!r}: every edit needs a non-empty target")
    ids = tok(" " + text, add_special_tokens=False)["input_ids"]
    if len(ids) > 1 and _is_lone_space(tok, ids[0]):
        return ids[:1], ids[1:]
    return [], ids


def encode_pair(
    tok: PreTrainedTokenizerBase, prompt: str, answer: str, *, max_length: int | None = None
) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one pair, unpadded, both of length len(context) + len(answer) - 1.

    When `max_length` is given and the sequence is longer, context tokens are dropped from the left
    (the answer is never truncated).
    """
    context = tok(prompt.rstrip())["input_ids"]
    lead, ans = split_answer(tok, answer)
    context = context + lead
    if not context:
        raise EngineError(f"empty prompt for answer {answer!r}: every edit needs a prompt")
    if max_length is not None:
        overflow = len(context) + len(ans) - 1 - max_length
        if overflow >= len(context):
            raise EngineError(f"answer {answer!r} alone exceeds max_length={max_length}; shorten the answer")
        if overflow > 0:
            context = context[overflow:]
    full = context + ans
    input_ids = full[:-1]
    labels = [IGNORE_INDEX] * (len(context) - 1) + ans
    assert len(labels) == len(input_ids)
    return input_ids, labels


def _pad_id(tok: PreTrainedTokenizerBase) -> int:
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    if pad is None:
        raise EngineError("the tokenizer has neither a pad nor an eos token; set tok.pad_token")
    return int(pad)


def tokenize_pairs(
    tok: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    answers: Sequence[str],
    *,
    max_length: int | None = None,
) -> TokenizedBatch:
    """Teacher-forcing batch for prompt → answer pairs (layout and lone-space rule: module docstring).

    Args:
        tok: the model's tokenizer.
        prompts: B rendered prompts.
        answers: B answers, no leading space.
        max_length: cap on T (context truncated from the left).

    Returns:
        TokenizedBatch with B×T input_ids, attention_mask, labels.
    """
    if len(prompts) != len(answers):
        raise EngineError(f"{len(prompts)} prompts but {len(answers)} answers; give one answer per prompt")
    if not prompts:
        raise EngineError("no requests to tokenize")
    pairs = [encode_pair(tok, p, a, max_length=max_length) for p, a in zip(prompts, answers)]
    width = max(len(ids) for ids, _ in pairs)
    pad = _pad_id(tok)
    input_ids = torch.full((len(pairs), width), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(pairs), width), dtype=torch.long)
    labels = torch.full((len(pairs), width), IGNORE_INDEX, dtype=torch.long)
    for row, (ids, lab) in enumerate(pairs):
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, : len(ids)] = 1
        labels[row, : len(lab)] = torch.tensor(lab, dtype=torch.long)
    return TokenizedBatch(input_ids, attention_mask, labels)


def tokenize_requests(
    tok: PreTrainedTokenizerBase, requests: Sequence[EditRequest], *, max_length: int | None = None
) -> TokenizedBatch:
    """Teacher-forcing batch for the edit prompts → new targets of `requests` (what the capture uses)."""
    return tokenize_pairs(tok, [r.prompt for r in requests], [r.target for r in requests], max_length=max_length)


def tokenize_prompts(tok: PreTrainedTokenizerBase, prompts: Sequence[str]) -> PromptBatch:
    """Right-padded prompts (rstripped, with the tokenizer's special tokens), for next-token prediction."""
    if not prompts:
        raise EngineError("no prompts to tokenize")
    rows = [tok(p.rstrip())["input_ids"] for p in prompts]
    if any(not r for r in rows):
        raise EngineError("an empty prompt cannot be continued; give every prompt some text")
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), _pad_id(tok), dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        attention_mask[i, : len(r)] = 1
    return PromptBatch(input_ids, attention_mask, attention_mask.sum(dim=1) - 1)


def chunked(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    """Consecutive slices of at most `size` items (LM mini-batches)."""
    if size < 1:
        raise EngineError(f"batch size must be at least 1, got {size}")
    for start in range(0, len(items), size):
        yield items[start : start + size]
