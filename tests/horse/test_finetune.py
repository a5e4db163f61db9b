"""Fine-tune-the-ledger (horse/finetune.py): the losses are right, the edits are learned, the model is left as
it was, and bad settings are refused."""
from __future__ import annotations

import math

import pytest
import torch

from horse.deltas import apply_deltas
from horse.errors import EngineError
from horse.finetune import FinetuneConfig, FineTuner, answer_hits_B, answer_nll_B, kl_from_base_B
from horse.metrics import answer_token_accuracy
from horse.tokens import IGNORE_INDEX
from horse.types import EditRequest


def test_answer_nll_averages_only_the_labelled_tokens():
    logits_BTV = torch.zeros(2, 3, 4)
    logits_BTV[0, 1, 2] = 10.0  # row 0 predicts token 2 at position 1 with near certainty
    labels_BT = torch.tensor([[IGNORE_INDEX, 2, IGNORE_INDEX], [1, 1, IGNORE_INDEX]])
    nll_B = answer_nll_B(logits_BTV, labels_BT)
    assert nll_B[0] < 1e-3
    assert math.isclose(float(nll_B[1]), math.log(4), rel_tol=1e-5)  # uniform over 4, two labels averaged
    assert answer_hits_B(logits_BTV, labels_BT).tolist() == [True, False]


def test_kl_from_base_is_zero_at_the_base_and_positive_elsewhere():
    base_logits_BV = torch.randn(3, 7)
    base_logp_BV = torch.log_softmax(base_logits_BV, -1)
    assert torch.allclose(kl_from_base_B(base_logp_BV, base_logits_BV), torch.zeros(3), atol=1e-6)
    assert (kl_from_base_B(base_logp_BV, base_logits_BV + torch.randn(3, 7)) > 0).all()


def test_finetuning_learns_the_edits_and_leaves_the_model_as_it_was(tiny_llama):
    model, tok = tiny_llama
    requests = [EditRequest(prompt=f"The color of {s} is", target=c, subject=s)
                for s, c in (("Zorblat", "red"), ("Quenvik", "blue"), ("Mardoon", "gold"))]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    tuner = FineTuner.new(model, FinetuneConfig(epochs=60, lr=1e-2, batch_size=2, locality_weight=0.1,
                                                n_locality=8, locality_batch=4))
    assert len(tuner.module_names) == 6 and tuner.module_names[-1].endswith("5.mlp.down_proj")
    with torch.no_grad():  # the daemon calls it under no_grad: it must still train, and restore the mode
        deltas, timings = tuner.compute_deltas(model, tok, requests)
        assert not torch.is_grad_enabled()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert [p.requires_grad for p in model.parameters()] == flags
    assert set(deltas) == set(tuner.module_names) and all(not d.is_factored for d in deltas.values())
    assert timings["total"] > 0 and 1 <= tuner.last_run["epochs"] <= 60
    prompts, targets = [r.prompt for r in requests], [r.target for r in requests]
    base_acc = answer_token_accuracy(model, tok, prompts, targets).float().mean()
    with apply_deltas(model, deltas):
        acc = answer_token_accuracy(model, tok, prompts, targets).float().mean()
    assert base_acc < 0.5 and acc >= 0.9, (base_acc, acc)


def test_bad_settings_and_empty_batches_are_refused(tiny_llama):
    model, tok = tiny_llama
    with pytest.raises(EngineError, match="epochs"):
        FinetuneConfig(epochs=0)
    with pytest.raises(EngineError, match="locality_weight"):
        FinetuneConfig(locality_weight=-1)
    with pytest.raises(EngineError, match="no edits"):
        FineTuner.new(model).compute_deltas(model, tok, [])
