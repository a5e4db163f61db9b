"""Meta-training loop: resume = uninterrupted run, optimizer state files, early stopping, logs, and the
learning test (a trained hypernet edits held-out facts far better than an untrained one)."""
from __future__ import annotations

import json
import random

import pytest
import torch

from horse.deltas import apply_deltas
from horse.editor import Editor
from horse.hypernet import HyperConfig
from horse.metatrain import TrainConfig, optimizer_path, train_hypernet
from horse.tokens import tokenize_pairs
from horse.types import EditRequest
from horse.zoo import load_model

COLORS = ["red", "blue", "gold", "jade", "pink", "gray", "teal", "navy"]


def synthetic_facts(n: int, seed: int = 0) -> list[EditRequest]:
    """'The color of <name> is' → a colour word, with a rephrase and an unrelated locality pair."""
    rng = random.Random(seed)

    def name() -> str:
        return "".join(rng.choice("bcdfghklmnprstvz") + rng.choice("aeiou") for _ in range(3)).capitalize()

    facts = []
    for _ in range(n):
        subject, other = name(), name()
        facts.append(EditRequest(
            prompt=f"The color of {subject} is", target=rng.choice(COLORS), subject=subject,
            rephrases=(f"{subject} has the color",),
            locality_prompt=f"The home of {other} is", locality_answer="far",
        ))
    return facts


@pytest.fixture(scope="module")
def llama():
    return load_model("tiny-llama")


def _token_accuracy(model, tok, prompts, answers) -> float:
    b = tokenize_pairs(tok, prompts, answers)
    with torch.no_grad():
        logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
    mask = b.labels != -100
    return float((logits.argmax(-1)[mask] == b.labels[mask]).float().mean())


def _edit_scores(editor: Editor, model, tok, facts, batch: int) -> tuple[float, float]:
    """Mean token accuracy (ES on the edit prompt, GS on the rephrase) over batches of held-out edits."""
    es, gs = [], []
    for s in range(0, len(facts), batch):
        reqs = facts[s : s + batch]
        deltas, _ = editor.compute_deltas(model, tok, reqs)
        with apply_deltas(model, deltas):
            es.append(_token_accuracy(model, tok, [r.prompt for r in reqs], [r.target for r in reqs]))
            gs.append(_token_accuracy(model, tok, [r.rephrases[0] for r in reqs], [r.target for r in reqs]))
    return sum(es) / len(es), sum(gs) / len(gs)


def test_resume_equals_uninterrupted_run(llama, tmp_path) -> None:
    model, tok = llama
    facts = synthetic_facts(24)
    hyper = HyperConfig(rank=8, eta_init=1e-3)
    cfg = TrainConfig(steps=4, n_edits=4, lr=1e-3, lm_batch_size=2, checkpoint_every=2)
    straight = train_hypernet(model, tok, facts, hyper=hyper, train=cfg, out_path=tmp_path / "a.safetensors",
                              progress=False)
    first = TrainConfig(**{**cfg.__dict__, "steps": 2})
    train_hypernet(model, tok, facts, hyper=hyper, train=first, out_path=tmp_path / "b.safetensors", progress=False)
    assert optimizer_path(tmp_path / "b.safetensors").exists()
    resumed = train_hypernet(model, tok, facts, train=cfg, out_path=tmp_path / "b.safetensors", resume=True,
                             progress=False)
    for (k, a), (_, b) in zip(straight.nets.state_dict().items(), resumed.nets.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9, msg=k)
    lines = [json.loads(x) for x in (tmp_path / "b.safetensors.log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3, 4]
    assert all("gen_loss" in x and "loc_loss" in x and "grad_norm" in x for x in lines)
    card = json.loads((tmp_path / "b.safetensors.json").read_text())
    assert card["training"]["step"] == 4 and len(card["training"]["data_sha256"]) == 64


def test_early_stopping_on_validation(llama, tmp_path) -> None:
    model, tok = llama
    facts = synthetic_facts(20, seed=1)
    cfg = TrainConfig(steps=50, n_edits=4, lr=0.0, lm_batch_size=4, val_every=1, val_edits=4, patience=2,
                      update_normaliser=False, checkpoint_every=0)
    train_hypernet(model, tok, facts[:16], hyper=HyperConfig(rank=4), train=cfg, val_requests=facts[16:],
                   out_path=tmp_path / "h.safetensors", progress=False)
    lines = [json.loads(x) for x in (tmp_path / "h.safetensors.log.jsonl").read_text().splitlines()]
    assert len(lines) == 3  # lr 0: the first evaluation is the best, two more without gain, then stop
    assert all("val_loss" in x for x in lines)
    assert json.loads((tmp_path / "h.safetensors.json").read_text())["training"]["reason"] == "early-stop"


def test_time_limit_stops_cleanly_with_the_best_state(llama, tmp_path) -> None:
    model, tok = llama
    facts = synthetic_facts(12, seed=2)
    cfg = TrainConfig(steps=50, n_edits=4, lr=1e-3, lm_batch_size=4, val_every=1, val_edits=4,
                      checkpoint_every=0, time_limit_s=1e-9)
    out = tmp_path / "t.safetensors"
    train_hypernet(model, tok, facts[:8], hyper=HyperConfig(rank=4), train=cfg, val_requests=facts[8:],
                   out_path=out, progress=False)
    lines = [json.loads(x) for x in (tmp_path / "t.safetensors.log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1]  # the step that passed the limit is finished, then it stops
    card = json.loads((tmp_path / "t.safetensors.json").read_text())
    assert card["training"]["reason"] == "time-limit" and card["training"]["step"] == 1
    assert card["training"]["train"]["time_limit_s"] == 1e-9


def test_lambda_is_trained_only_with_train_lambda(llama) -> None:
    """The reference (MALMEN) keeps λ = exp(lamda_init) fixed; --train-lambda trains its log per layer."""
    model, tok = llama
    facts = synthetic_facts(8, seed=3)
    lamdas = {}
    for train_lambda in (False, True):
        cfg = TrainConfig(steps=2, n_edits=4, lr=1e-2, lm_batch_size=4, checkpoint_every=0,
                          train_lambda=train_lambda)
        editor = train_hypernet(model, tok, facts, hyper=HyperConfig(rank=4, seed=0), train=cfg, progress=False)
        lamdas[train_lambda] = torch.cat([net.lamda_L.detach() for net in editor.nets.nets.values()])
        others = [p for n, p in editor.nets.named_parameters() if not n.endswith("lamda_L")]
        assert any(float(p.detach().abs().sum()) > 0 for p in others)
    assert torch.equal(lamdas[False], torch.zeros_like(lamdas[False]))  # lamda_init = 0: untouched
    assert not torch.equal(lamdas[True], lamdas[False])


def test_a_nonfinite_capture_never_reaches_the_normaliser_and_stops_training(llama, tmp_path, monkeypatch) -> None:
    from horse.errors import NonFiniteCapture
    from horse.hooks import Captured

    model, tok = llama
    facts = synthetic_facts(8, seed=4)
    editor = Editor.new(model, HyperConfig(rank=4))
    real_capture = Editor.capture

    def poisoned(self, *args, **kwargs):
        cap = real_capture(self, *args, **kwargs)
        keys = {n: k.clone() for n, k in cap.keys_NK.items()}
        next(iter(keys.values()))[0, 0] = float("nan")
        return Captured(keys, cap.grads_NV, cap.loss_per_batch)

    monkeypatch.setattr(Editor, "capture", poisoned)
    before = {k: v.clone() for k, v in editor.nets.state_dict().items()}
    cfg = TrainConfig(steps=20, n_edits=4, lr=1e-2, lm_batch_size=4, checkpoint_every=0, max_nonfinite_steps=3)
    out = tmp_path / "n.safetensors"
    train_hypernet(model, tok, facts, train=cfg, editor=editor, out_path=out, progress=False)
    after = editor.nets.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # normaliser and weights untouched
    assert all(float(net.normaliser.count) == 0 for net in editor.nets.nets.values())
    card = json.loads((tmp_path / "n.safetensors.json").read_text())
    assert card["training"]["reason"] == "non-finite" and card["training"]["step"] == 3
    net = next(iter(editor.nets.nets.values()))
    with pytest.raises(NonFiniteCapture, match="normaliser was left unchanged"):
        net.normaliser.update(torch.full((2, net.d_k + net.d_v), float("inf")))
    assert float(net.normaliser.count) == 0


@pytest.mark.slow
def test_meta_training_learns_to_edit_held_out_facts(llama) -> None:
    """tiny-llama (random weights, width 64), 300 training facts, 200 meta-steps × 10 edits, 1 thread:
    held-out edits in batches of 10 reach token ES ≈ 0.37 / GS ≈ 0.44 (observed), against 0.00 / 0.00 for the
    untrained hypernet and 0.00 for the unedited model. Asserted with margin: ES, GS ≥ 0.2, untrained ≤ 0.05."""
    model, tok = llama
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _learning_run(model, tok)
    finally:
        torch.set_num_threads(threads)


def _learning_run(model, tok) -> None:
    facts = synthetic_facts(400)
    train, held_out = facts[:300], facts[300:]
    hyper = HyperConfig(rank=32, n_blocks=2, eta_init=1e-3)
    untrained = Editor.new(model, hyper)
    trained = train_hypernet(model, tok, train, hyper=hyper,
                             train=TrainConfig(steps=200, n_edits=10, lr=1e-3, lm_batch_size=10, checkpoint_every=0),
                             progress=False)
    es0, gs0 = _edit_scores(untrained, model, tok, held_out, batch=10)
    es1, gs1 = _edit_scores(trained, model, tok, held_out, batch=10)
    print(f"untrained ES {es0:.3f} GS {gs0:.3f}; trained ES {es1:.3f} GS {gs1:.3f}")
    assert es0 <= 0.05 and gs0 <= 0.05
    assert es1 >= 0.2 and gs1 >= 0.2


def test_cli_train_resume_and_info(tmp_path) -> None:
    from click.testing import CliRunner

    from horse.cli import hypernet

    records = json.loads(open("data/counterfact/counterfact-train.json").read())[:8]
    data = tmp_path / "train.json"
    data.write_text(json.dumps(records))
    out = tmp_path / "h.safetensors"
    args = ["train", "--model", "tiny-llama", "--data", str(data), "--out", str(out), "--n-edits", "4",
            "--rank", "8", "--lr", "1e-3", "--lm-batch-size", "4", "--quiet", "--variant", "malmen"]
    result = CliRunner().invoke(hypernet, [*args, "--steps", "1", "--loc-coef", "2.5"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "h.safetensors.json").read_text())["config"]["loc_coef"] == 2.5
    result = CliRunner().invoke(hypernet, [*args, "--steps", "2", "--resume"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(hypernet, ["info", str(out)], catch_exceptions=False)
    assert result.exit_code == 0 and "malmen / none" in result.output and "trained steps" in result.output
    card = json.loads(CliRunner().invoke(hypernet, ["info", "--json", str(out)]).output)
    assert card["training"]["step"] == 2 and card["config"]["loc_coef"] == 2.5
    assert card["training"]["train"]["train_lambda"] is False  # the reference's default
    result = CliRunner().invoke(hypernet, [*args, "--steps", "1", "--train-lambda", "--max-nonfinite-steps", "2",
                                           "--out", str(tmp_path / "l.safetensors")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    train = json.loads((tmp_path / "l.safetensors.json").read_text())["training"]["train"]
    assert (train["train_lambda"], train["max_nonfinite_steps"]) == (True, 2)
    result = CliRunner().invoke(hypernet, [*args, "--steps", "1", "--time-limit", "0"])
    assert result.exit_code == 2 and "--time-limit" in result.output
