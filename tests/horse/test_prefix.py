"""horse/prefix.py: scores through a prefix cache equal full forward passes, on the model it was made for and on
any change of the blocks above its start; rows from batches of other widths combine; what it cannot serve (left
padding, other weights below its start, mixed block types) falls back or is refused."""
from __future__ import annotations

import torch

from horse import metrics
from horse.arch import default_target_modules, get_module
from horse.prefix import PrefixCache, prefix_fingerprint, right_padded

PROMPTS = ["The color of Zorblat is", "A", "Quenvik lives in the old town of", "The capital of Arvenia is",
           "Mirelda plays the"]
ANSWERS = ["green", "b", "Tarsk", "Lumen city", "violin"]


def _scores(model, tok, prefix=None, batch_size=2):
    lp, acc = metrics.score_answers(model, tok, PROMPTS, ANSWERS, batch_size=batch_size, prefix=prefix)
    nxt = metrics.next_token_ids(model, tok, PROMPTS, batch_size=batch_size, prefix=prefix)
    return lp, acc, nxt


def _assert_same(a, b):
    assert torch.allclose(a[0], b[0], atol=1e-5), (a[0], b[0])
    assert torch.equal(a[1], b[1]) and torch.equal(a[2], b[2])


def test_a_prefix_cache_gives_the_full_scores_and_runs_the_lower_blocks_once_per_text(tiny_model):
    model, tok = tiny_model
    names = default_target_modules(model, 2)
    cache = PrefixCache.for_model(model, names)
    assert cache is not None and cache.start[1] > 0
    full = _scores(model, tok)
    _assert_same(_scores(model, tok, cache), full)
    assert cache.captured == 2 * len(PROMPTS) and cache.hits == 0  # pairs and prompts are different token rows
    # rows captured in batches of two serve a batch of five (another padding width)
    _assert_same(_scores(model, tok, cache, batch_size=5), full)
    assert cache.captured == 2 * len(PROMPTS) and cache.hits == 2 * len(PROMPTS)


def test_the_cache_serves_a_model_changed_above_its_start_and_not_below(tiny_llama):
    model, tok = tiny_llama
    names = default_target_modules(model, 2)
    cache = PrefixCache.for_model(model, names)
    before = _scores(model, tok, cache)  # fill it on the unchanged model
    above, below = get_module(model, names[-1]).weight, get_module(model, "model.layers.0.mlp.down_proj").weight
    old_above, old_below = above.detach().clone(), below.detach().clone()
    try:
        with torch.no_grad():
            above.add_(torch.randn_like(above) * 0.5)  # a candidate: the edited blocks change
        changed = _scores(model, tok)
        assert not torch.allclose(changed[0], before[0])
        _assert_same(_scores(model, tok, cache), changed)
        assert prefix_fingerprint(model, cache.start) == cache.fingerprint
        with torch.no_grad():
            below.add_(0.5)  # a block below the start changes: other inputs, another fingerprint
        assert prefix_fingerprint(model, cache.start) != cache.fingerprint
        fresh = PrefixCache.for_model(model, names, cache.to_tensors(), cache.fingerprint)
        assert fresh.rows == {}  # the kept rows are not used for other weights
        _assert_same(_scores(model, tok, fresh), _scores(model, tok))
    finally:
        with torch.no_grad():
            above.copy_(old_above)
            below.copy_(old_below)


def test_the_cache_covers_changes_from_its_start_on_only(tiny_llama):
    model, _ = tiny_llama
    names = default_target_modules(model, 2)
    cache = PrefixCache.for_model(model, names)
    assert cache.covers(names) and cache.covers([]) and cache.covers([f"model.layers.{cache.start[1]}.mlp.up_proj"])
    assert not cache.covers([*names, "model.layers.0.mlp.down_proj"])
    assert not cache.covers(["lm_head"]) and not cache.covers(["transformer.h.3.mlp.c_proj"])


def test_kept_rows_reload_for_the_same_weights(tiny_llama):
    model, tok = tiny_llama
    names = default_target_modules(model, 2)
    cache = PrefixCache.for_model(model, names)
    full = _scores(model, tok, cache)
    kept = {k: v.clone() for k, v in cache.to_tensors().items()}
    assert len(kept) == 2 * len(PROMPTS)
    again = PrefixCache.for_model(model, names, kept, cache.fingerprint)
    _assert_same(_scores(model, tok, again), full)
    assert again.captured == 0 and again.hits == 2 * len(PROMPTS)
    # the kept rows really are what the later blocks see: spoiled rows give other scores
    spoiled = PrefixCache.for_model(model, names, {k: torch.zeros_like(v) for k, v in kept.items()}, cache.fingerprint)
    assert not torch.allclose(_scores(model, tok, spoiled)[0], full[0])


def test_left_padding_and_mixed_block_types_fall_back(tiny_llama):
    model, tok = tiny_llama
    names = default_target_modules(model, 2)
    cache = PrefixCache.for_model(model, names)
    ids = torch.tensor([[5, 6, 7], [0, 8, 9]])
    left = torch.tensor([[1, 1, 1], [0, 1, 1]])
    assert right_padded(torch.tensor([[1, 1, 1], [1, 1, 0]])) and not right_padded(left)
    assert cache.block_input(model, ids, left) is None and not cache.rows
    model.config.layer_types = ["full_attention", "sliding_attention"] * (model.config.num_hidden_layers // 2)
    try:
        assert PrefixCache.for_model(model, names) is None
    finally:
        del model.config.layer_types
