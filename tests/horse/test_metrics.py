"""horse/metrics.py on hand-computed cases (a bigram model whose logits we set) and on the tiny models."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from horse.metrics import (
    agreement_by_group,
    answer_logprobs,
    answer_token_accuracy,
    continuation_matches,
    evaluate,
    generated_matches,
    greedy_continuations,
    harmonic_mean,
    logits_at,
    next_token_ids,
    score_answers,
)
from horse.errors import EngineError
from horse.tokens import tokenize_pairs
from horse.types import EditRequest

V = 258  # tiny tokenizer vocabulary


class Bigram(nn.Module):
    """logits[t] = table[input_ids[t]]: every probability is a hand-computable softmax of one table row."""

    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.zeros(V, V))

    def set(self, prev: str, nxt: str, value: float) -> None:
        with torch.no_grad():
            self.table[ord(prev), ord(nxt)] = value

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        return SimpleNamespace(logits=self.table[input_ids])


def logp(value: float) -> float:
    """log-prob of a token whose logit is `value` in a row otherwise zero."""
    return value - math.log(math.exp(value) + V - 1)


UNIFORM = -math.log(V)


def test_logprob_and_accuracy_by_hand(tiny_tok):
    model = Bigram()
    model.set(" ", "x", 3.0)  # after the (context) space, x is likely
    # "ab" → " xy": the lone space is context; scored: x after " ", y after x
    lp = answer_logprobs(model, tiny_tok, ["ab"], ["xy"])
    assert lp.item() == pytest.approx((logp(3.0) + UNIFORM) / 2, rel=1e-5)
    acc = answer_token_accuracy(model, tiny_tok, ["ab"], ["xy"])
    assert acc.item() == pytest.approx(0.5)  # x is the argmax after " ", y is not the argmax after x
    model.set("x", "y", 1.0)
    assert answer_token_accuracy(model, tiny_tok, ["ab"], ["xy"]).item() == 1.0
    assert answer_logprobs(model, tiny_tok, ["ab"], ["xy"]).item() == pytest.approx((logp(3.0) + logp(1.0)) / 2, rel=1e-5)


def test_batching_and_padding_do_not_change_scores(tiny_tok):
    model = Bigram()
    torch.manual_seed(0)
    with torch.no_grad():
        model.table.normal_()
    prompts = ["a", "a much longer prompt here", "mid prompt"]
    answers = ["long answer text", "b", "cc"]
    together = score_answers(model, tiny_tok, prompts, answers, batch_size=3)
    alone = [score_answers(model, tiny_tok, [p], [a]) for p, a in zip(prompts, answers)]
    for k in range(2):
        torch.testing.assert_close(together[k], torch.cat([s[k] for s in alone]))


def row_lp(row: dict[str, float], token: str) -> float:
    """log-prob of `token` in a table row that is zero except for `row`."""
    z = sum(math.exp(v) for v in row.values()) + V - len(row)
    return row.get(token, 0.0) - math.log(z)


def test_evaluate_counterfact_metrics_by_hand(tiny_tok):
    model = Bigram()
    model.set(" ", "n", 3.0)  # new answers start with n
    model.set("t", "t", 1.0)
    space, t_row = {"n": 3.0}, {"t": 1.0}
    reqs = [
        EditRequest(prompt="p1", target="nn", target_true="tt", rephrases=("r1", "r2"),
                    locality_prompt="l1", locality_answer="tt"),
        EditRequest(prompt="p2", target="nz", target_true="tt", locality_prompt="l2", locality_answer="zz"),
    ]
    out = evaluate(model, tiny_tok, reqs, with_generation=False)
    p_nn = math.exp((row_lp(space, "n") + UNIFORM) / 2)
    p_nz = p_nn  # n→z is uniform like n→n
    p_tt = math.exp((row_lp(space, "t") + row_lp(t_row, "t")) / 2)
    p_zz = math.exp((row_lp(space, "z") + UNIFORM) / 2)
    assert p_nn > p_tt  # so ES = PS = 1
    assert out["cf_es"] == 1.0 and out["cf_ps"] == 1.0
    assert out["cf_es_mag"] == pytest.approx(((p_nn - p_tt) + (p_nz - p_tt)) / 2, rel=1e-4)
    assert out["cf_ps_mag"] == pytest.approx(p_nn - p_tt, rel=1e-4)  # only request 1 has rephrases
    # NS: request 1: P(tt) < P(nn) → 0; request 2: P(zz) < P(nz) → 0
    assert out["cf_ns"] == 0.0 and out["cf_score"] == 0.0
    assert out["cf_ns_mag"] == pytest.approx(((p_tt - p_nn) + (p_zz - p_nz)) / 2, rel=1e-4)
    # token accuracy: "nn": n correct after " ", n after n not (argmax is id 0) → 0.5; "nz" → 0.5
    assert out["token_es"] == pytest.approx(0.5) and out["token_gs"] == pytest.approx(0.5)
    # locality "tt": t after " " is not the argmax (n is), t after t is → 0.5; "zz" → 0
    assert out["token_ls"] == pytest.approx(0.25)
    assert out["n_ps"] == 1 and out["n_ns"] == 2 and out["n_es"] == 2
    model.set(" ", "t", 4.0)  # now the true answer wins
    out = evaluate(model, tiny_tok, reqs[:1], with_generation=False)
    assert out["cf_es"] == 0.0 and out["cf_ns"] == 1.0 and out["cf_score"] == 0.0


def test_harmonic_mean():
    assert harmonic_mean([0.5, 0.5, 0.5]) == pytest.approx(0.5)
    assert harmonic_mean([1.0, 0.5, 0.25]) == pytest.approx(3 / (1 + 2 + 4))
    assert harmonic_mean([1.0, 0.0, 1.0]) == 0.0
    assert math.isnan(harmonic_mean([1.0, float("nan")]))


def test_agreement_by_group():
    now, base = torch.tensor([1, 2, 3, 4, 5]), torch.tensor([1, 0, 3, 0, 0])
    assert agreement_by_group(now, base, ["cf", "zs", "cf", "cf", "zs"]) == {"cf": pytest.approx(2 / 3), "zs": 0.0}
    assert list(agreement_by_group(now, base, ["b", "a", "b", "a", "a"])) == ["b", "a"]  # first-seen order
    with pytest.raises(EngineError, match="one of each per prompt"):
        agreement_by_group(now, base, ["cf"])


def test_continuation_rule():
    assert continuation_matches(" Paris, the capital", "Paris")
    assert continuation_matches("  PARIS.", "paris")
    assert continuation_matches(" New   York City", "New York")
    assert not continuation_matches(" Parisian food", "Paris")  # must stop at a word boundary
    assert not continuation_matches(" the Paris", "Paris")
    assert not continuation_matches("\nParis", "Paris")  # cut at the first newline
    assert continuation_matches(" 2006\n1998", "2006")


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_head_only_at_answer_positions_equals_full_logits(name, request):
    from horse.zoo import build_tiny_model

    model, tok = build_tiny_model(name)
    batch = tokenize_pairs(tok, ["The sky is", "Grass"], ["blue", "green and wet"])
    rows, cols = batch.answer_positions()
    with torch.no_grad():
        full = model(**batch.model_inputs()).logits[rows, cols]
        part = logits_at(model, batch.input_ids, batch.attention_mask, rows, cols)
    torch.testing.assert_close(part, full, rtol=1e-5, atol=1e-5)


def test_next_tokens_and_greedy_generation_match_a_manual_loop(tiny_llama):
    model, tok = tiny_llama
    prompts = ["The sky is", "A"]
    ids = next_token_ids(model, tok, prompts)
    texts = greedy_continuations(model, tok, prompts, max_new_tokens=4)
    for prompt, first, text in zip(prompts, ids.tolist(), texts):
        seq = tok(prompt)["input_ids"]
        with torch.no_grad():
            generated = []
            for _ in range(4):
                nxt = int(model(torch.tensor([seq])).logits[0, -1].argmax())
                generated.append(nxt)
                seq.append(nxt)
        assert first == generated[0]
        assert text == tok.decode(generated, skip_special_tokens=True)
    matches = generated_matches(model, tok, prompts, [texts[0].strip() or "x", "zzz"], max_new_tokens=4)
    assert matches.tolist() == [bool(texts[0].strip()), False]


def test_evaluate_restores_training_mode_and_reports_generation(tiny_gpt2):
    model, tok = tiny_gpt2
    model.train()
    reqs = [EditRequest(prompt="The sky is", target="blue", target_true="green", rephrases=("Sky colour:",),
                        locality_prompt="Grass is", locality_answer="green")]
    out = evaluate(model, tok, reqs)
    assert model.training
    assert set(out) >= {"cf_es", "cf_ps", "cf_ns", "cf_score", "token_es", "token_gs", "token_ls", "gen_es", "gen_ps"}
    lp_new = answer_logprobs(model, tok, ["The sky is"], ["blue"])
    lp_true = answer_logprobs(model, tok, ["The sky is"], ["green"])
    assert out["cf_es"] == float(lp_new.exp() > lp_true.exp())


def test_batches_concatenate_to_the_whole(tiny_llama):
    from horse.metrics import concat_scores, request_scores, summarise_scores

    model, tok = tiny_llama
    reqs = [
        EditRequest(prompt=f"Fact {i} is", target=f"t{i}", target_true=("old" if i % 2 else None),
                    rephrases=(f"F{i}:",) * (i % 3), locality_prompt=("Loc" if i % 4 else None), locality_answer="a")
        for i in range(7)
    ]
    whole = evaluate(model, tok, reqs, with_generation=False)
    parts = [request_scores(model, tok, reqs[:3]), request_scores(model, tok, reqs[3:])]
    merged = summarise_scores(concat_scores(parts))
    assert merged.keys() == whole.keys()
    for key in whole:
        assert merged[key] == pytest.approx(whole[key], rel=1e-5, abs=1e-7, nan_ok=True), key
    assert whole["n_es"] == 3 and whole["n_requests"] == 7 and whole["n_ns"] == 5
    assert whole["n_ps"] == 2  # requests with a rephrase AND a target_true: i = 1, 5
