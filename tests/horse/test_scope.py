"""horse/scope.py: a scoped model gives the edited outputs where an edited subject has occurred and the base
model's elsewhere, bit for bit, in full passes and in cached generation."""
from __future__ import annotations

import pytest
import torch

from horse import metrics
from horse.arch import default_target_modules, get_module
from horse.errors import EngineError
from horse.scope import Scope, SubjectIndex, scope_mask_BT, subject_starts_BT
from tests.horse.conftest import step_by_step_generations

SUBJECTS = ["Zorblat", "Quenvik Arvenia"]
IN_SCOPE = ["The color of Zorblat is", "Zorblat is a", "Quenvik Arvenia lives in the old town of"]
OUT_OF_SCOPE = ["The capital of Arvenia is", "Mirelda plays the", "Quenvik lives in"]


def _edit(model, names, scale=0.7):
    """Add a random delta to `names`; return the base weights (copies) and the edited model's state."""
    base = {n: get_module(model, n).weight.detach().clone() for n in names}
    torch.manual_seed(3)
    with torch.no_grad():
        for n in names:
            w = get_module(model, n).weight
            w.add_(torch.randn_like(w) * scale)
    return base


def _restore(model, base):
    with torch.no_grad():
        for n, w in base.items():
            get_module(model, n).weight.copy_(w)


def test_the_mask_switches_on_where_a_subject_starts_and_stays_on(tiny_tok):
    index = SubjectIndex.build(tiny_tok, SUBJECTS + ["", "  "])
    assert len(index) == 2
    ids = tiny_tok(["The color of Zorblat is", "Zorblat"], add_special_tokens=False, padding=True,
                   return_tensors="pt")["input_ids"]
    starts = subject_starts_BT(ids, index)
    assert starts.sum(dim=1).tolist() == [1, 1] and bool(starts[1, 0])
    mask = scope_mask_BT(ids, index)
    first = int(starts[0].nonzero()[0])
    assert first == len(tiny_tok("The color of", add_special_tokens=False)["input_ids"])
    assert not mask[0, :first].any() and mask[0, first:].all()
    n = len(tiny_tok("The capital of", add_special_tokens=False)["input_ids"])
    none = tiny_tok(["The capital of"], add_special_tokens=False, return_tensors="pt")["input_ids"]
    assert not scope_mask_BT(none, index).any()
    assert scope_mask_BT(none, index, torch.tensor([True])).all() and none.shape[1] == n


def test_scoped_outputs_are_the_edited_ones_in_scope_and_the_base_ones_outside(tiny_model):
    model, tok = tiny_model
    names = default_target_modules(model, 2)
    base_next = metrics.next_token_ids(model, tok, OUT_OF_SCOPE + IN_SCOPE)
    base_lp, _ = metrics.score_answers(model, tok, OUT_OF_SCOPE, ["Tarsk"] * 3)
    base_in_lp, _ = metrics.score_answers(model, tok, IN_SCOPE, ["Tarsk"] * 3)
    base = _edit(model, names)
    try:
        edited_next = metrics.next_token_ids(model, tok, OUT_OF_SCOPE + IN_SCOPE)
        with Scope(model, base, SubjectIndex.build(tok, SUBJECTS)):
            scoped_next = metrics.next_token_ids(model, tok, OUT_OF_SCOPE + IN_SCOPE)
            out_lp, _ = metrics.score_answers(model, tok, OUT_OF_SCOPE, ["Tarsk"] * 3)
            in_lp, _ = metrics.score_answers(model, tok, IN_SCOPE, ["Tarsk"] * 3)
        assert torch.equal(scoped_next[:3], base_next[:3])  # outside: the base model's, exactly
        assert torch.equal(out_lp, base_lp)
        assert not torch.equal(edited_next[:3], base_next[:3])  # (the edit does move them unscoped)
        assert torch.equal(scoped_next[3:], edited_next[3:])  # a subject at the end: its position is edited
        # the positions before the subject see the base weights: the in-scope scores are neither the base's nor
        # (through attention to those positions) exactly the unscoped edit's
        assert not torch.equal(in_lp, base_in_lp)
        # hooks off: the edited model again
        assert torch.equal(metrics.next_token_ids(model, tok, OUT_OF_SCOPE + IN_SCOPE), edited_next)
    finally:
        _restore(model, base)


def test_a_whole_text_in_scope_is_the_edited_model(tiny_model):
    model, tok = tiny_model
    names = default_target_modules(model, 2)
    prompts = ["Zorblat is a", "Zorblat and the color of"]
    base = _edit(model, names)
    try:
        # the subject is the first word: every position is in scope, so the scores are the unscoped ones
        lp, acc = metrics.score_answers(model, tok, prompts, ["green", "red"])
        with Scope(model, base, SubjectIndex.build(tok, ["Zorblat"])):
            lp_s, acc_s = metrics.score_answers(model, tok, prompts, ["green", "red"])
        assert torch.equal(lp, lp_s) and torch.equal(acc, acc_s)
    finally:
        _restore(model, base)


def test_cached_generation_carries_the_scope_across_steps(tiny_model):
    model, tok = tiny_model
    names = default_target_modules(model, 2)
    prompts = ["The color of Zorblat is", "Mirelda plays the", "The home of Quenvik"]
    base = _edit(model, names)
    try:
        with Scope(model, base, SubjectIndex.build(tok, SUBJECTS + ["Quenvik Arvenia"])) as scope:
            cached = metrics.greedy_continuations(model, tok, prompts, max_new_tokens=6)
            # the same texts without a cache: each step a full pass over prompt + what was generated so far
            uncached = step_by_step_generations(model, tok, prompts, 6)
            assert scope._active_B is not None
        assert cached == uncached
    finally:
        _restore(model, base)


def test_a_base_weight_of_another_shape_is_refused_and_leaves_no_hook(tiny_llama):
    model, tok = tiny_llama
    name = default_target_modules(model, 1)[0]
    before = metrics.next_token_ids(model, tok, OUT_OF_SCOPE)
    with pytest.raises(EngineError, match="another model"):
        Scope(model, {name: torch.zeros(3, 3)}, SubjectIndex.build(tok, SUBJECTS))
    assert torch.equal(metrics.next_token_ids(model, tok, OUT_OF_SCOPE), before)


def test_a_subject_inside_a_longer_word_is_not_a_match(tiny_tok):
    index = SubjectIndex.build(tiny_tok, ["Paul"])
    texts = ["Pauline sings", "McPaul sings", "Paul sings", "(Paul) sings", "I met Paul", "Paul's hat"]
    found = [bool(subject_starts_BT(tiny_tok([t], add_special_tokens=False, return_tensors="pt")["input_ids"],
                                    index).any()) for t in texts]
    assert found == [False, False, True, True, True, True]


def test_a_prefix_cache_replays_a_scoped_model_with_its_mask(tiny_llama):
    from horse.prefix import PrefixCache

    model, tok = tiny_llama
    names = default_target_modules(model, 2)
    cache = PrefixCache.for_model(model, names)
    prompts = OUT_OF_SCOPE + IN_SCOPE
    metrics.next_token_ids(model, tok, prompts, prefix=cache)  # rows captured on the base
    base = _edit(model, names)
    try:
        with Scope(model, base, SubjectIndex.build(tok, SUBJECTS)):
            full = metrics.next_token_ids(model, tok, prompts)
            lp_full, _ = metrics.score_answers(model, tok, prompts, ["Tarsk"] * 6)
            replayed = metrics.next_token_ids(model, tok, prompts, prefix=cache)
            lp_replayed, _ = metrics.score_answers(model, tok, prompts, ["Tarsk"] * 6, prefix=cache)
            assert cache.hits > 0
        assert torch.equal(full, replayed) and torch.allclose(lp_full, lp_replayed, atol=1e-5)
        unscoped, _ = metrics.score_answers(model, tok, prompts, ["Tarsk"] * 6, prefix=cache)
        assert not torch.allclose(unscoped[:3], lp_full[:3], atol=1e-3)  # (the scope does change them)
    finally:
        _restore(model, base)


def test_a_model_takes_one_scope_at_a_time(tiny_llama):
    model, tok = tiny_llama
    index = SubjectIndex.build(tok, SUBJECTS)
    with Scope(model, {}, index):
        with pytest.raises(EngineError, match="already has a scope"):
            Scope(model, {}, index)
    Scope(model, {}, index.extended(tok, ["Mirelda"])).remove()
    assert index.extended(tok, SUBJECTS) is index and len(index.extended(tok, ["Mirelda"])) == 3
