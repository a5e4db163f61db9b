"""The gate on the real model: SmolLM2-135M with the shipped HORSE hypernet, through the real CLI (SQLite).

A batch mixes benign edits with edits that rewrite protected facts ("The capital of France is" → Rome). The
gate measures the candidate, sees protected facts flip, bisects, rejects exactly the harmful edits and
publishes the rest; `ask` shows a new fact; rollback to base gives the base weights bit for bit; requeued,
the same edits publish the same weights again. No stand-in anywhere: the engine edits, the gate measures.
Canary agreement is not checked here (0): HORSE moves unrelated prompts (NS, see the README), and the
point of this test is the protected facts. About a minute on 2 CPU cores.
"""
from __future__ import annotations

import json

import pytest
import torch

from ledger.store import Store
from tests.daemon.conftest import add_facts, apply_json, write_config
from tests.daemon.test_end_to_end import _weights
from tests.horse.conftest import require_smollm2

BENIGN = [
    {"subject": "Danielle Darrieux", "prompt": "The mother tongue of {} is", "target": "English",
     "target_true": "French"},
    {"subject": "Lionel Messi", "prompt": "{} plays the sport of", "target": "basketball", "target_true": "football"},
    {"subject": "Albert Einstein", "prompt": "{} is known for his work in the field of", "target": "chemistry",
     "target_true": "physics"},
]
HARMFUL = [
    {"subject": "France", "prompt": "The capital of {} is", "target": "Rome", "target_true": "Paris"},
    {"subject": "Japan", "prompt": "The capital of {} is", "target": "Seoul", "target_true": "Tokyo"},
]


@pytest.mark.parametrize("backend", ["sqlite"])
def test_gate_rejects_only_the_edits_that_rewrite_protected_facts(db_url, daemon_settings, cli_runner, tmp_path):
    require_smollm2()
    from horse.zoo import default_cache_dir

    from ledger.config import Settings

    settings = daemon_settings(db_url, model="smollm2-135m", hypernet="", cache_dir=str(default_cache_dir()),
                               preserve_weight=Settings().preserve_weight,  # the shipped default, not the tiny tests' 0
                               gate_canary_file="", gate_min_canary_agreement=0.0, gate_min_efficacy=0.3,
                               gate_min_retention=0.0, gate_bisect_depth=3)
    cfg = write_config(tmp_path / "config.toml", settings)
    store = Store(db_url)
    for fact in HARMFUL:  # what the base model holds and must keep
        cli_runner(cfg, "protect", "add", "--subject", fact["subject"], "--prompt", fact["prompt"],
                   "--target", fact["target_true"])
    add_facts(cli_runner, cfg, tmp_path, "batch", BENIGN + HARMFUL)
    benign_ids, harmful_ids = [1, 2, 3], [4, 5]
    base = _weights(settings, store, None)

    result = apply_json(cli_runner, cfg)
    assert result["status"] == "published", result
    assert sorted(int(i) for i in result["rejected"]) == harmful_ids, result
    for reason in result["rejected"].values():
        assert "protected facts flipped" in reason and "bisection" in reason
    applied = result["applied"]
    assert applied and set(applied) <= set(benign_ids) and not set(result["failed"]) & {str(i) for i in harmful_ids}
    batch = store.get_batch(result["batch_id"])
    assert batch.metrics["gate"]["passed"] is True and batch.metrics["gate"]["protected_flipped"] == []
    assert batch.metrics["bisect"][0]["passed"] is False
    for e in store.get_edits(harmful_ids):
        assert e.status == "rejected" and "protected" in e.last_error
    s1 = result["snapshot_id"]

    # ask shows a new fact: an applied edit whose prompt took fully now continues with its target
    efficacy = batch.metrics["efficacy"]
    edit = max(store.get_edits(applied), key=lambda e: efficacy[str(e.id)]["prompt_acc"])
    assert efficacy[str(edit.id)]["prompt_acc"] == 1.0
    assert efficacy[str(edit.id)]["generated"] == 1.0  # greedy decoding produces it, as `ask` shows below
    assert 0 < batch.metrics["efficacy_generated_mean"] <= 1
    asked = json.loads(cli_runner(cfg, "ask", edit.rendered_prompt, "--json", "--max-new-tokens", "3").stdout)
    assert asked["snapshot_id"] == s1 and asked["continuation"].strip().startswith(edit.target_new), asked
    before = json.loads(cli_runner(cfg, "ask", edit.rendered_prompt, "--snapshot", "base", "--json").stdout)
    assert not before["continuation"].strip().startswith(edit.target_new)
    protected = json.loads(cli_runner(cfg, "ask", "The capital of France is", "--json",
                                      "--max-new-tokens", "2").stdout)
    assert protected["continuation"].strip().startswith("Paris"), protected

    # rollback with requeue: base weights bit for bit; the same edits publish the same weights again
    weights_s1 = store.get_snapshot(s1).metrics["weights_sha256"]
    rb = json.loads(cli_runner(cfg, "rollback", "base", "--requeue", "--json").stdout)
    assert rb["rolled_back_snapshots"] == [s1] and sorted(rb["requeued_edits"]) == sorted(applied)
    after = _weights(settings, store, None)
    assert all(torch.equal(after[k], base[k]) for k in base)
    again = apply_json(cli_runner, cfg)
    assert again["status"] == "published" and sorted(again["applied"]) == sorted(applied), again
    assert store.get_snapshot(again["snapshot_id"]).metrics["weights_sha256"] == weights_s1
    diff = json.loads(cli_runner(cfg, "diff", str(s1), str(again["snapshot_id"]), "--json").stdout)
    assert diff["only_in_a"] == [] and diff["only_in_b"] == []
    assert f"*  {again['snapshot_id']}" in cli_runner(cfg, "snapshots").stdout
    assert {e.status for e in store.get_edits(harmful_ids)} == {"rejected"}
    store.close()
