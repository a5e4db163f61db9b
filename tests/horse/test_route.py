"""horse/route.py: each text gets the deltas of the subjects it names, and only those; texts that name none are
the base model's, bit for bit, in full passes, batches with padding and cached generation."""
from __future__ import annotations

import pytest
import torch

from horse import metrics
from horse.arch import default_target_modules, get_module, module_shape_KV
from horse.deltas import LayerDelta, apply_deltas
from horse.route import (Route, RouteError, RouteTable, Router, check_table, load_table, named_in, save_table,
                         table_digest)
from tests.horse.conftest import step_by_step_generations

OUT_OF_SCOPE = ["The capital of Arvenia is", "Mirelda plays the", "Quenvik lives in"]


def _route(model, names, subject, seed, rows=2, aliases=(), scale=0.5):
    torch.manual_seed(seed)
    factors = {}
    for n in names:
        k, v = module_shape_KV(get_module(model, n))
        factors[n] = (torch.randn(rows, k) * scale, torch.randn(rows, v) * scale)
    return Route((subject, *aliases), (seed,), factors)


def _table(model, tok, routes):
    return RouteTable({r.subject: r for r in routes}).index(tok)


def _dense(route):
    return {n: LayerDelta(dense_KV=(k.T @ c)) for n, (k, c) in route.factors.items()}


def test_texts_that_name_no_subject_are_the_base_model_bit_for_bit(tiny_model):
    model, tok = tiny_model
    names = default_target_modules(model, 2)
    table = _table(model, tok, [_route(model, names, "Zorblat", 1), _route(model, names, "Quenvik Arvenia", 2)])
    base_lp, _ = metrics.score_answers(model, tok, OUT_OF_SCOPE, ["Tarsk"] * 3)
    base_next = metrics.next_token_ids(model, tok, OUT_OF_SCOPE)
    with Router(model, table):
        lp, _ = metrics.score_answers(model, tok, OUT_OF_SCOPE, ["Tarsk"] * 3)
        nxt = metrics.next_token_ids(model, tok, OUT_OF_SCOPE)
        moved, _ = metrics.score_answers(model, tok, ["The color of Zorblat is"], ["Tarsk"])
    assert torch.equal(lp, base_lp) and torch.equal(nxt, base_next)
    before, _ = metrics.score_answers(model, tok, ["The color of Zorblat is"], ["Tarsk"])
    assert not torch.allclose(moved, before, atol=1e-3)  # (the route does change a text that names it)


def test_a_text_that_starts_with_its_subject_gets_exactly_that_subjects_delta(tiny_model):
    model, tok = tiny_model
    names = default_target_modules(model, 2)
    zor, que = _route(model, names, "Zorblat", 1), _route(model, names, "Quenvik", 2)
    prompts = ["Zorblat is a", "Zorblat and the color of"]
    with apply_deltas(model, _dense(zor)):
        merged, _ = metrics.score_answers(model, tok, prompts, ["green", "red"])
    with Router(model, _table(model, tok, [zor, que])):
        routed, _ = metrics.score_answers(model, tok, prompts, ["green", "red"])
    assert torch.allclose(merged, routed, atol=1e-4)
    with apply_deltas(model, _dense(que)), apply_deltas(model, _dense(zor)):
        both, _ = metrics.score_answers(model, tok, prompts, ["green", "red"])
    assert not torch.allclose(both, routed, atol=1e-3)  # the other subject's delta is not in it


def test_each_row_of_a_padded_batch_gets_its_own_subjects(tiny_model):
    model, tok = tiny_model
    names = default_target_modules(model, 2)
    routes = [_route(model, names, "Zorblat", 1), _route(model, names, "Quenvik Arvenia", 2, rows=3)]
    prompts = ["The color of Zorblat is", "Mirelda plays the long game with", "Quenvik Arvenia and Zorblat met in",
               "Quenvik Arvenia"]
    with Router(model, _table(model, tok, routes)):
        batched, _ = metrics.score_answers(model, tok, prompts, ["Tarsk"] * 4, batch_size=4)
        alone = torch.cat([metrics.score_answers(model, tok, [p], ["Tarsk"])[0] for p in prompts])
    assert torch.allclose(batched, alone, atol=1e-5)


def test_aliases_name_the_same_subject_and_words_must_be_whole(tiny_tok):
    table = RouteTable({"Lionel Messi": Route(("Lionel Messi", "Messi"), (1,), {}),
                        "Paul": Route(("Paul",), (2,), {})}).index(tiny_tok)
    found = named_in(["Messi scored", "Lionel Messi scored", "Pauline sings", "McPaul sings", "Paul sings",
                      "(Paul) sings", "I met Paul", "Messiah"], tiny_tok, table)
    assert found == [{"Lionel Messi"}, {"Lionel Messi"}, set(), set(), {"Paul"}, {"Paul"}, {"Paul"}, set()]


def test_cached_generation_equals_step_by_step_full_passes(tiny_model):
    model, tok = tiny_model
    names = default_target_modules(model, 2)
    table = _table(model, tok, [_route(model, names, "Zorblat", 1), _route(model, names, "Quenvik", 2)])
    # (a name at the very end of a prompt counts at once; a full pass over a generated continuation of that word
    # would not find it, so the prompts name their subjects before the last word)
    prompts = ["The color of Zorblat is", "Mirelda plays the", "The home of Quenvik is"]
    with Router(model, table):
        cached = metrics.greedy_continuations(model, tok, prompts, max_new_tokens=6)
        uncached = step_by_step_generations(model, tok, prompts, 6)
    assert cached == uncached


def test_a_table_survives_its_file_bit_for_bit(tiny_llama, tmp_path):
    model, tok = tiny_llama
    names = default_target_modules(model, 2)
    table = _table(model, tok, [_route(model, names, "Zorblat", 1, aliases=("Zorb",)),
                                _route(model, names, "Quenvik", 2, rows=1)])
    save_table(tmp_path / "r.safetensors", table)
    back, _ = load_table(tmp_path / "r.safetensors")
    lazy, _ = load_table(tmp_path / "r.safetensors", lazy=True)
    check_table(lazy)
    assert table_digest(lazy) == table_digest(table)
    assert table_digest(back) == table_digest(table) and back.sequences == table.sequences
    assert torch.equal(back.word_start_X, table.word_start_X)
    changed = table.with_routes({"Quenvik": _route(model, names, "Quenvik", 3, rows=1)})
    assert table_digest(changed) != table_digest(table) and set(changed.sequences) == set(table.sequences)
    (tmp_path / "bad.safetensors").write_bytes(b"not a table")
    with pytest.raises(RouteError, match="cannot read"):
        load_table(tmp_path / "bad.safetensors")


def test_routes_for_modules_the_model_lacks_are_refused_and_leave_no_hook(tiny_llama):
    model, tok = tiny_llama
    table = RouteTable({"Zorblat": Route(("Zorblat",), (1,), {"model.nowhere": (torch.zeros(1, 4),
                                                                                 torch.zeros(1, 4))})}).index(tok)
    before = metrics.next_token_ids(model, tok, ["The color of Zorblat is"])
    with pytest.raises(RouteError, match="another model"):
        Router(model, table)
    assert torch.equal(metrics.next_token_ids(model, tok, ["The color of Zorblat is"]), before)
    with Router(model, RouteTable().index(tok)):
        with pytest.raises(RouteError, match="already has a router"):
            Router(model, RouteTable())


def test_a_suspended_router_serves_the_base_model(tiny_llama):
    model, tok = tiny_llama
    names = default_target_modules(model, 2)
    prompts = ["The color of Zorblat is"]
    base, _ = metrics.score_answers(model, tok, prompts, ["Tarsk"])
    with Router(model, _table(model, tok, [_route(model, names, "Zorblat", 1)])) as router:
        with router.suspended():
            inside, _ = metrics.score_answers(model, tok, prompts, ["Tarsk"])
        routed, _ = metrics.score_answers(model, tok, prompts, ["Tarsk"])
    assert torch.equal(inside, base) and not torch.allclose(routed, base, atol=1e-3)
