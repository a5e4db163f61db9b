"""horse.sums: the statistics of a union of edit sets are the sums of theirs, and solving them gives what
`Editor.compute_deltas` gives for all the edits in one batch (the daemon's `hypernet_from_base` nights)."""
from __future__ import annotations

import pytest
import torch

from horse.editor import Editor
from horse.errors import EngineError
from horse.hypernet import HyperConfig
from horse.sums import EditSums
from horse.types import EditRequest
from horse.zoo import load_model

A = [EditRequest(prompt=f"The capital of land {i} is", target=f"Town{i}") for i in range(5)]
B = [EditRequest(prompt=f"The river of realm {i} flows into", target=f"Sea of {i}") for i in range(4)]


@pytest.fixture(scope="module")
def model_tok():
    return load_model("tiny-llama")


def _trained_like(model, tok, spread: str) -> Editor:
    """An editor with frozen normaliser statistics and non-identity hypernet blocks (as after meta-training)."""
    torch.manual_seed(0)
    editor = Editor.new(model, HyperConfig(rank=8, spread=spread))
    editor.normaliser_stats(editor.capture(model, tok, A + B), update=True)
    with torch.no_grad():  # parameters only: the normaliser's statistics are buffers
        for p in editor.nets.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return editor


@pytest.mark.parametrize("spread", ["reference", "none"])
@pytest.mark.parametrize("prior", [False, True])
def test_sums_of_two_batches_solve_to_the_one_batch_edit(model_tok, spread, prior) -> None:
    model, tok = model_tok
    editor = _trained_like(model, tok, spread)
    if prior:  # the preservation prior, μ(9) = 3 / 9 = 0.33
        moments = {n: (x := torch.randn(64, k)).T @ x / 64 for n, (k, _) in zip(editor.module_names, editor.shapes_KV)}
        editor.set_preservation(moments, 3.0, exponent=1.0)
    assert editor.sums_supported
    # the same LM mini-batches on both sides: each gradient is of its own mini-batch's mean CE (MALMEN), so a
    # token's residual depends on how many answer tokens share its mini-batch, and nothing else
    sums = editor.edit_sums(model, tok, A, lm_batch_size=5) + editor.edit_sums(model, tok, B, lm_batch_size=5)
    assert sums.n_edits == len(A) + len(B) and sums.n_tokens == editor.capture(model, tok, A + B).n_tokens
    expected, _ = editor.compute_deltas(model, tok, A + B, lm_batch_size=5)
    got = editor.deltas_from_sums(sums)
    assert set(got) == set(expected)
    for name in expected:
        want = expected[name].to_dense()
        assert want.abs().max() > 0
        torch.testing.assert_close(got[name].to_dense(), want, rtol=2e-3, atol=2e-4 * float(want.abs().max()))
    # taking a set away again gives the rest
    rest = sums - editor.edit_sums(model, tok, B, lm_batch_size=5)
    only_a = editor.edit_sums(model, tok, A, lm_batch_size=5)
    assert rest.n_edits == len(A)
    for x, y in zip(rest.kr_KV, only_a.kr_KV):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6 * float(y.abs().max()))


def test_sums_round_trip_and_refusals(model_tok) -> None:
    model, tok = model_tok
    editor = _trained_like(model, tok, "reference")
    sums = editor.edit_sums(model, tok, A)
    again = EditSums.from_tensors(sums.to_tensors())
    assert (again.n_edits, again.n_tokens) == (sums.n_edits, sums.n_tokens) and all(torch.equal(x, y) for x, y in zip(again.kk_KK, sums.kk_KK))
    with pytest.raises(EngineError, match="not one of"):
        EditSums.from_tensors({k: v for k, v in sums.to_tensors().items() if k != "rr_L"})
    with pytest.raises(EngineError, match="at least one"):
        editor.edit_sums(model, tok, [])
    other = _trained_like(model, tok, "gram-schmidt")
    assert not other.sums_supported
    with pytest.raises(EngineError, match="depend on the batch"):
        other.edit_sums(model, tok, A)
    editor.update_normaliser = True  # the running normaliser: rows depend on what came before
    assert not editor.sums_supported
