"""horse/tokens.py: the (prompt, answer) layout, label masks, padding and the lone-space rule."""
from __future__ import annotations

import pytest
import torch

from horse.errors import EngineError
from horse.tokens import (
    IGNORE_INDEX,
    chunked,
    encode_pair,
    split_answer,
    tokenize_pairs,
    tokenize_prompts,
    tokenize_requests,
)
from horse.types import EditRequest


def b(text: str) -> list[int]:
    """Byte ids of the tiny tokenizer."""
    return list(text.encode())


def test_layout_by_hand(tiny_tok):
    # context = "ab is" + lone " " (moved from the answer); answer = "cd"
    input_ids, labels = encode_pair(tiny_tok, "ab is", "cd")
    assert input_ids == b("ab is c")
    assert labels == [IGNORE_INDEX] * 5 + b("cd")
    # labels[t] is what follows input[t] in the full text "ab is cd"
    full = b("ab is cd")
    for t, lab in enumerate(labels):
        if lab != IGNORE_INDEX:
            assert lab == full[t + 1]


def test_lone_space_rule_tiny(tiny_tok):
    lead, ans = split_answer(tiny_tok, "Paris")
    assert lead == b(" ") and ans == b("Paris")
    lead, ans = split_answer(tiny_tok, "  x y ")  # stripped, inner space kept and scored
    assert lead == b(" ") and ans == b("x y")
    with pytest.raises(EngineError, match="empty answer"):
        split_answer(tiny_tok, "   ")


def test_batch_padding_and_masks(tiny_tok):
    batch = tokenize_pairs(tiny_tok, ["ab is", "x"], ["cd", "e f"])
    assert batch.input_ids.shape == batch.labels.shape == batch.attention_mask.shape == (2, 7)
    assert batch.input_ids[1].tolist() == b("x e ") + [tiny_tok.pad_token_id] * 3
    assert batch.attention_mask.tolist() == [[1] * 7, [1] * 4 + [0] * 3]
    assert batch.labels[1].tolist() == [IGNORE_INDEX] + b("e f") + [IGNORE_INDEX] * 3
    assert batch.n_tokens == 5
    assert batch.answer_lengths_B().tolist() == [2, 3]
    req_N, pos_N = batch.answer_positions()
    assert req_N.tolist() == [0, 0, 1, 1, 1] and pos_N.tolist() == [5, 6, 1, 2, 3]
    assert batch.answer_targets_N().tolist() == b("cd") + b("e f")
    # no label on padding, every label under the attention mask
    assert not (batch.answer_mask & (batch.attention_mask == 0)).any()


def test_tokenize_requests_uses_target_not_target_true(tiny_tok):
    req = EditRequest(prompt="The sky is", target="green", target_true="blue")
    batch = tokenize_requests(tiny_tok, [req])
    assert batch.answer_targets_N().tolist() == b("green")


def test_max_length_truncates_context_from_the_left(tiny_tok):
    ids, labels = encode_pair(tiny_tok, "a long prompt", "xy", max_length=4)
    assert len(ids) == 4 and ids == b("pt x") and labels[-2:] == b("xy")
    with pytest.raises(EngineError, match="exceeds"):
        encode_pair(tiny_tok, "p", "abcdef", max_length=3)


def test_mismatched_lengths_refused(tiny_tok):
    with pytest.raises(EngineError, match="one answer per prompt"):
        tokenize_pairs(tiny_tok, ["a", "b"], ["c"])


def test_prompt_batch(tiny_tok):
    pb = tokenize_prompts(tiny_tok, ["abc ", "x"])
    assert pb.input_ids[0].tolist() == b("abc") and pb.last_index_B.tolist() == [2, 0]


def test_chunked():
    assert [list(c) for c in chunked(list(range(5)), 2)] == [[0, 1], [2, 3], [4]]


def test_smollm2_leading_space_rule(smollm2_tokenizer):
    tok = smollm2_tokenizer
    lead, ans = split_answer(tok, "Paris")
    assert lead == [] and tok.convert_ids_to_tokens(ans) == ["ĠParis"]  # words keep their space
    lead, ans = split_answer(tok, "2006")
    assert tok.convert_ids_to_tokens(lead) == ["Ġ"]  # digits: the lone space goes to the context
    assert tok.decode(ans) == "2006"
    ids, labels = encode_pair(tok, "It was founded in", "2006")
    assert tok.decode(ids) == "It was founded in 200"
    assert tok.decode([x for x in labels if x != IGNORE_INDEX]) == "2006"
    # the concatenation equals the tokenisation of the running text
    assert ids + labels[-1:] == tok("It was founded in 2006")["input_ids"]
