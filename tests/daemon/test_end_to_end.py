"""End to end on tiny-llama with a hypernet meta-trained in the test, through the real CLI, on both backends.

test_apply_ask_rollback_requeue (real engine throughout): add edits → apply → snapshot published → edits
applied → ask shows the new fact → rollback base --requeue → bit-identical base weights → apply again →
the same snapshot weights, bit for bit.

test_harmful_batch_is_bisected: batch 1 with the real engine teaches facts, which are then protected; batch 2
mixes benign edits with edits that rewrite the protected facts; the gate catches it, bisection rejects only
the harmful edits, the rest publish; rollback → bit-identical weights → requeue → apply again. The tiny
random model cannot be edited usefully on top of an already edited tiny model by a hypernet trained for a
few seconds (new edits reach token accuracy ≈ 0 there — see test_edits_that_do_not_take_fail), so batch 2's
deltas come from a stand-in editor with known effects (large for the harmful edits, tiny for the benign).
Everything else — materialisation, gate measurements, bisection, files, rows — is the real daemon.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from daemon.materialise import links, materialise, weights_digest
from ledger.store import Store
from tests.daemon.conftest import COLORS, fact, write_config


def _add(cli_runner, cfg: Path, tmp_path: Path, name: str, facts: list[dict]) -> None:
    path = tmp_path / f"{name}.jsonl"
    path.write_text("".join(json.dumps(f) + "\n" for f in facts))
    cli_runner(cfg, "add", "--from", str(path))


def _apply(cli_runner, cfg: Path) -> dict:
    return json.loads(cli_runner(cfg, "apply", "--json").stdout)


def _weights(settings, store: Store, snapshot_id: int | None) -> dict[str, torch.Tensor]:
    with store.session(write=False) as s:
        chain = links(s, snapshot_id)
    m = materialise(settings, chain)
    return {k: v.detach().clone() for k, v in m.model.state_dict().items()}


def test_apply_ask_rollback_requeue(db_url, daemon_settings, cli_runner, tmp_path):
    settings = daemon_settings(db_url)
    cfg = write_config(tmp_path / "config.toml", settings)
    store = Store(db_url)
    base_weights = _weights(settings, store, None)

    _add(cli_runner, cfg, tmp_path, "batch1", [fact(i) for i in range(4)])
    first = _apply(cli_runner, cfg)
    assert first["status"] == "published", first
    s1, taught = first["snapshot_id"], first["applied"]
    assert len(taught) >= 3, first  # the trained hypernet makes (nearly) every training fact take
    for reason in first["failed"].values():
        assert reason.startswith("did not take: efficacy")
    assert store.head("tiny-llama").id == s1
    for e in store.get_edits(taught):
        assert (e.status, e.snapshot_id) == ("applied", s1)
    snap = store.get_snapshot(s1)
    assert snap.metrics["n_edits"] == len(taught) and snap.metrics["layer_norms"] and snap.bytes > 0
    batch = store.get_batch(first["batch_id"])
    assert batch.status == "published" and batch.metrics["gate"]["passed"] is True
    assert set(batch.metrics["efficacy"]) == {str(i) for i in range(1, 5)}

    # ask shows the new fact. The tiny model's byte-level tokenizer splits " red" into " " + "red" and the
    # engine edits the answer after the space (the lone-space rule of horse/tokens.py), so ask with the space.
    taught_subjects = {e.subject for e in store.get_edits(taught)}
    i = next(i for i in range(4) if fact(i)["subject"] in taught_subjects)
    prompt = f"The color of {fact(i)['subject']} is "
    asked = json.loads(cli_runner(cfg, "ask", prompt, "--json", "--max-new-tokens", "4").stdout)
    assert asked["snapshot_id"] == s1 and asked["continuation"].startswith(COLORS[i]), asked
    assert asked["top_tokens"][0]["token"] == COLORS[i][0]
    base_ask = json.loads(cli_runner(cfg, "ask", prompt, "--snapshot", "base", "--json").stdout)
    assert not base_ask["continuation"].startswith(COLORS[i])
    assert cli_runner(cfg, "verify").stdout.strip().endswith("OK")

    # rollback to base with requeue: base weights bit for bit, the edits pending again
    rb = json.loads(cli_runner(cfg, "rollback", "base", "--requeue", "--json").stdout)
    assert rb["rolled_back_snapshots"] == [s1] and sorted(rb["requeued_edits"]) == sorted(taught)
    assert store.head("tiny-llama") is None and store.get_snapshot(s1).status == "rolled_back"
    assert {e.status for e in store.get_edits(taught)} == {"pending"}
    after = _weights(settings, store, None)
    assert all(torch.equal(after[k], base_weights[k]) for k in base_weights)

    # apply again: the same edits on the same head give the same weights, bit for bit
    again = _apply(cli_runner, cfg)
    assert again["status"] == "published" and set(taught) <= set(again["applied"])
    if sorted(again["applied"]) == sorted(taught):
        assert store.get_snapshot(again["snapshot_id"]).metrics["weights_sha256"] == snap.metrics["weights_sha256"]
    store.close()


class StandInEditor:
    """Deltas with known effects: a large random change of every edited layer for an edit whose subject is in
    `harmful_subjects`, a negligible one for the others (seeded by the edit's text: deterministic)."""

    def __init__(self, real) -> None:
        self.module_names = real.module_names
        self.fingerprint = real.fingerprint
        self.harmful_subjects: set[str] = set()

    def compute_deltas(self, model, tokenizer, requests, **_):
        from horse.arch import get_module, module_shape_KV
        from horse.deltas import LayerDelta

        total = {}
        for r in requests:
            seed = int.from_bytes(hashlib.sha256(f"{r.prompt}|{r.target}".encode()).digest()[:4], "big")
            gen = torch.Generator().manual_seed(seed)
            scale = 300.0 if r.subject in self.harmful_subjects else 1e-6
            for name in self.module_names:
                k, v = module_shape_KV(get_module(model, name))
                d = torch.randn(k, v, generator=gen) * scale
                total[name] = total.get(name, 0) + d
        return {n: LayerDelta(dense_KV=d) for n, d in total.items()}, {"capture": 0.0}


def test_harmful_batch_is_bisected(db_url, daemon_settings, cli_runner, tmp_path, monkeypatch):
    from horse.editor import Editor

    settings = daemon_settings(db_url)
    cfg = write_config(tmp_path / "config.toml", settings)
    store = Store(db_url)

    # batch 1, real engine: teach four facts, then protect what the model learned
    _add(cli_runner, cfg, tmp_path, "batch1", [fact(i) for i in range(4)])
    first = _apply(cli_runner, cfg)
    s1 = first["snapshot_id"]
    taught = {e.subject: e.target_new for e in store.get_edits(first["applied"])}
    assert len(taught) >= 3
    for subject, target in taught.items():
        cli_runner(cfg, "protect", "add", "--prompt", "The color of {} is", "--subject", subject, "--target", target)
    weights_s1 = _weights(settings, store, s1)

    # batch 2: two benign edits, two that rewrite protected facts (stand-in deltas, see the module docstring)
    real_from_checkpoint = Editor.from_checkpoint.__func__
    stand_in: dict[str, StandInEditor] = {}

    def fake_from_checkpoint(cls, path, model, *, force=False):
        stand_in["editor"] = StandInEditor(real_from_checkpoint(cls, path, model, force=force))
        stand_in["editor"].harmful_subjects = set(list(taught)[:2])
        return stand_in["editor"]

    monkeypatch.setattr(Editor, "from_checkpoint", classmethod(fake_from_checkpoint))
    harmful_subjects = list(taught)[:2]
    cfg2 = write_config(tmp_path / "config2.toml", daemon_settings(db_url, gate_min_efficacy=0.0))
    _add(cli_runner, cfg2, tmp_path, "batch2",
         [fact(6), fact(7)] + [{**fact(0), "subject": s, "target": "jade" if taught[s] != "jade" else "pink"}
                               for s in harmful_subjects])
    pending = store.list_edits(status="pending", oldest_first=True)
    benign_ids, harmful_ids = [e.id for e in pending[:2]], [e.id for e in pending[2:]]
    second = json.loads(cli_runner(cfg2, "apply", "--json").stdout)
    assert second["status"] == "published", second
    assert sorted(int(i) for i in second["rejected"]) == harmful_ids, second
    assert second["applied"] == benign_ids and second["failed"] == {}
    for reason in second["rejected"].values():
        assert "protected facts flipped" in reason and "bisection" in reason
    for e in store.get_edits(harmful_ids):
        assert e.status == "rejected" and "protected" in e.last_error
    s2 = second["snapshot_id"]
    assert store.get_snapshot(s2).parent_id == s1
    metrics = store.get_batch(second["batch_id"]).metrics
    assert metrics["bisect"][0]["passed"] is False and metrics["gate"]["passed"] is True
    assert metrics["gate"]["protected_flipped"] == [] and store.get_snapshot(s2).metrics["gate"]["passed"]
    events = store.events(edit_id=harmful_ids[0], oldest_first=True)
    assert [e.kind for e in events][-1] == "edit.rejected" and events[-1].payload["gate"]["protected_flip_share"] > 0

    out = cli_runner(cfg2, "snapshots").stdout
    assert f"*  {s2}" in out
    diff = json.loads(cli_runner(cfg2, "diff", str(s1), str(s2), "--json").stdout)
    assert diff["only_in_b"] == benign_ids and diff["only_in_a"] == []

    # rollback to snapshot 1 with requeue: bit-identical weights; apply again publishes on top of snapshot 1
    rb = json.loads(cli_runner(cfg2, "rollback", str(s1), "--requeue", "--json").stdout)
    assert rb["rolled_back_snapshots"] == [s2] and rb["requeued_edits"] == benign_ids
    assert store.head("tiny-llama").id == s1 and store.get_snapshot(s2).status == "rolled_back"
    after = _weights(settings, store, s1)
    assert all(torch.equal(after[k], weights_s1[k]) for k in weights_s1)
    assert cli_runner(cfg2, "verify").stdout.strip().endswith("OK")
    third = json.loads(cli_runner(cfg2, "apply", "--json").stdout)
    assert third["status"] == "published" and third["applied"] == benign_ids
    assert store.get_snapshot(third["snapshot_id"]).parent_id == s1
    assert {e.status for e in store.get_edits(harmful_ids)} == {"rejected"}  # rejected edits stay rejected
    store.close()


def test_edits_that_do_not_take_fail_with_the_measured_value(db_url, daemon_settings, cli_runner, tmp_path):
    settings = daemon_settings(db_url, gate_min_efficacy=1.01, max_attempts=2)  # above any efficacy: none takes
    cfg = write_config(tmp_path / "config.toml", settings)
    store = Store(db_url)
    _add(cli_runner, cfg, tmp_path, "hard", [fact(8, color="turquoise"), fact(9, color="magentaish")])
    result = _apply(cli_runner, cfg)
    assert result["status"] == "failed" and result["applied"] == [] and store.head("tiny-llama") is None
    for e in store.get_edits([1, 2]):
        assert e.status == "failed" and e.last_error.startswith("did not take: efficacy") and e.attempts == 1
    again = _apply(cli_runner, cfg)  # retried (attempts 1 < max_attempts 2), fails again
    assert again["status"] == "failed" and {e.attempts for e in store.get_edits([1, 2])} == {2}
    assert _apply(cli_runner, cfg)["status"] == "empty"  # no more retries
    store.close()
