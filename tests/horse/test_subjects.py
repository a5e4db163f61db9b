"""horse.subjects: each subject's delta from one batched capture equals `Editor.compute_deltas` of that subject's
edits alone; "joint-share" splits one joint solve into the subjects' rows, which sum to the joint delta."""
from __future__ import annotations

import pytest
import torch

from horse.editor import Editor
from horse.errors import EngineError
from horse.hypernet import HyperConfig
from horse.subjects import group_scale_N, subject_factors
from horse.types import EditRequest
from horse.zoo import load_model

GROUPS = [[EditRequest(prompt="The capital of Zorbland is", target="Town", subject="Zorbland"),
           EditRequest(prompt="Zorbland borders the sea of", target="Glass", subject="Zorbland")],
          [EditRequest(prompt="The river of Quenvik flows into", target="Sea of Ash", subject="Quenvik")],
          *[[EditRequest(prompt=f"Mardoon {i} is made of", target=f"stone{i}", subject=f"Mardoon {i}")]
            for i in range(3)]]


@pytest.fixture(scope="module")
def model_tok():
    return load_model("tiny-llama")


def _editor(model, tok, prior: bool) -> Editor:
    """Frozen normaliser statistics and non-identity hypernet blocks (as after meta-training)."""
    torch.manual_seed(0)
    editor = Editor.new(model, HyperConfig(rank=8, spread="reference"))
    editor.normaliser_stats(editor.capture(model, tok, [r for g in GROUPS for r in g]), update=True)
    with torch.no_grad():
        for p in editor.nets.parameters():
            p.add_(0.05 * torch.randn_like(p))
    if prior:
        moments = {n: (x := torch.randn(64, k)).T @ x / 64 for n, (k, _) in zip(editor.module_names, editor.shapes_KV)}
        editor.set_preservation(moments, 3.0, exponent=1.0, floor=0.1)
    return editor


def _dense(factors):
    return {n: (left.T @ coef) for n, (left, coef) in factors.items()}


@pytest.mark.parametrize("prior", [False, True])
def test_each_subject_from_one_capture_is_its_edits_solved_alone(model_tok, prior):
    model, tok = model_tok
    editor = _editor(model, tok, prior)
    factors, timings = subject_factors(editor, model, tok, GROUPS, lm_batch_size=3)
    assert set(timings) == {"capture", "hypernet", "spread_solve"}
    for group, got in zip(GROUPS, factors):
        # the group alone, in one LM mini-batch of its own: what the batched capture's rescaled gradients give
        want, _ = editor.compute_deltas(model, tok, group, lm_batch_size=len(group))
        for name, dense in _dense(got).items():
            ref = want[name].to_dense()
            assert ref.abs().max() > 0
            torch.testing.assert_close(dense, ref, rtol=2e-3, atol=2e-4 * float(ref.abs().max()))


def test_the_shares_of_a_joint_solve_sum_to_it(model_tok):
    model, tok = model_tok
    editor = _editor(model, tok, prior=True)
    requests = [r for g in GROUPS for r in g]
    shares, _ = subject_factors(editor, model, tok, GROUPS, solve="joint-share", lm_batch_size=3)
    joint, _ = editor.compute_deltas(model, tok, requests, lm_batch_size=3)
    for name in joint:
        total = sum(_dense(f)[name] for f in shares)
        ref = joint[name].to_dense()
        torch.testing.assert_close(total, ref, rtol=2e-3, atol=2e-4 * float(ref.abs().max()))


def test_gradient_scales_turn_a_minibatch_mean_into_the_groups():
    # two mini-batches (0: requests 0,1; 1: request 2), groups {0: requests 0,2}, {1: request 1}; tokens 2, 1, 3
    scale = group_scale_N([2, 1, 3], [0, 1, 0], [0, 0, 1])
    assert scale.tolist() == [3 / 5, 3 / 5, 3 / 1, 3 / 5, 3 / 5, 3 / 5]


def test_bad_groups_are_refused(model_tok):
    model, tok = model_tok
    editor = _editor(model, tok, prior=False)
    with pytest.raises(EngineError, match="at least one edit"):
        subject_factors(editor, model, tok, [GROUPS[0], []])
    with pytest.raises(EngineError, match="unknown solve"):
        subject_factors(editor, model, tok, GROUPS, solve="sideways")
