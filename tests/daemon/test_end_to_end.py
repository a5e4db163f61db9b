"""End to end on tiny-llama with a hypernet meta-trained in the test, through the real CLI, on both backends.

test_apply_ask_rollback_requeue (real engine throughout): add edits → apply → snapshot published → edits
applied → ask shows the new fact → rollback base --requeue → bit-identical base weights → apply again →
the same snapshot weights, bit for bit.

The harmful batch (edits that rewrite protected facts, caught by the gate, only they rejected by
bisection) runs on the real model in tests/daemon/test_smollm2_gate.py: the tiny random model has no
subject-specific knowledge, so any real edit there moves every prompt.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from daemon.materialise import links, load_base, materialise
from ledger.store import Store
from tests.daemon.conftest import COLORS, add_facts, apply_json, fact, write_config


def _weights(settings, store: Store, snapshot_id: int | None) -> dict[str, torch.Tensor]:
    with store.session(write=False) as s:
        chain = links(s, snapshot_id)
    m = materialise(settings, chain)
    return {k: v.detach().clone() for k, v in m.model.state_dict().items()}


def _first_night(db_url, daemon_settings, cli_runner, tmp_path, **overrides):
    """Settings with `overrides`, their config file, the store, and a first night of two facts (published)."""
    settings = daemon_settings(db_url, **overrides)
    cfg = write_config(tmp_path / "config.toml", settings)
    store = Store(db_url)
    add_facts(cli_runner, cfg, tmp_path, "night1", [fact(0), fact(1)])
    first = apply_json(cli_runner, cfg)
    assert first["status"] == "published" and first["applied"] == [1, 2], first
    return settings, cfg, store, first


def test_apply_ask_rollback_requeue(db_url, daemon_settings, cli_runner, tmp_path):
    settings = daemon_settings(db_url)
    cfg = write_config(tmp_path / "config.toml", settings)
    store = Store(db_url)
    base_weights = _weights(settings, store, None)

    add_facts(cli_runner, cfg, tmp_path, "batch1", [fact(i) for i in range(4)])
    first = apply_json(cli_runner, cfg)
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
    # Every taught fact is asked: each passed the gate on teacher-forced accuracy, but a greedy continuation
    # may still drift after its first token on this tiny model, so most (not all) must come out whole.
    taught_subjects = {e.subject for e in store.get_edits(taught)}
    whole = 0
    for i in (i for i in range(4) if fact(i)["subject"] in taught_subjects):
        prompt = f"The color of {fact(i)['subject']} is "
        asked = json.loads(cli_runner(cfg, "ask", prompt, "--json", "--max-new-tokens", "4").stdout)
        assert asked["snapshot_id"] == s1 and asked["top_tokens"][0]["token"] == COLORS[i][0], asked
        whole += asked["continuation"].startswith(COLORS[i])
        base_ask = json.loads(cli_runner(cfg, "ask", prompt, "--snapshot", "base", "--json").stdout)
        assert not base_ask["continuation"].startswith(COLORS[i])
    assert whole >= (len(taught) + 1) // 2, (whole, len(taught))
    assert cli_runner(cfg, "verify").stdout.strip().endswith("OK")

    # rollback to base with requeue: base weights bit for bit, the edits pending again
    rb = json.loads(cli_runner(cfg, "rollback", "base", "--requeue", "--json").stdout)
    assert rb["rolled_back_snapshots"] == [s1] and sorted(rb["requeued_edits"]) == sorted(taught)
    assert store.head("tiny-llama") is None and store.get_snapshot(s1).status == "rolled_back"
    assert {e.status for e in store.get_edits(taught)} == {"pending"}
    after = _weights(settings, store, None)
    assert all(torch.equal(after[k], base_weights[k]) for k in base_weights)

    # apply again: the same edits on the same head give the same weights, bit for bit
    again = apply_json(cli_runner, cfg)
    assert again["status"] == "published" and set(taught) <= set(again["applied"])
    if sorted(again["applied"]) == sorted(taught):
        assert store.get_snapshot(again["snapshot_id"]).metrics["weights_sha256"] == snap.metrics["weights_sha256"]
    store.close()


def test_edits_that_do_not_take_fail_with_the_measured_value(db_url, daemon_settings, cli_runner, tmp_path):
    settings = daemon_settings(db_url, gate_min_efficacy=1.0, max_attempts=2)  # untrained targets: none takes whole
    cfg = write_config(tmp_path / "config.toml", settings)
    store = Store(db_url)
    add_facts(cli_runner, cfg, tmp_path, "hard", [fact(8, color="turquoise"), fact(9, color="magentaish")])
    result = apply_json(cli_runner, cfg)
    assert result["status"] == "failed" and result["applied"] == [] and store.head("tiny-llama") is None
    for e in store.get_edits([1, 2]):
        assert e.status == "failed" and e.last_error.startswith("did not take: efficacy") and e.attempts == 1
    again = apply_json(cli_runner, cfg)  # retried (attempts 1 < max_attempts 2), fails again
    assert again["status"] == "failed" and {e.attempts for e in store.get_edits([1, 2])} == {2}
    assert apply_json(cli_runner, cfg)["status"] == "empty"  # no more retries
    store.close()


def test_a_later_night_supersedes_an_applied_edit_and_rollback_restores_it(db_url, daemon_settings, cli_runner,
                                                                           tmp_path):
    # efficacy bar 0 for the second night: new edits on an already edited tiny model barely take (see above);
    # retention bar 0.9: the superseded edit must not count against the edit that replaces it
    settings = daemon_settings(db_url, gate_min_efficacy=0.0, gate_min_retention=0.9)
    cfg = write_config(tmp_path / "config.toml", settings)
    store = Store(db_url)
    add_facts(cli_runner, cfg, tmp_path, "night1", [fact(0)])
    first = apply_json(cli_runner, cfg)
    assert first["status"] == "published" and first["applied"] == [1], first
    add_facts(cli_runner, cfg, tmp_path, "night2", [fact(0, color=COLORS[3])])  # same subject and prompt, new target
    assert store.get_edits([1])[0].status == "applied"  # adding does not touch an applied edit
    second = apply_json(cli_runner, cfg)
    assert second["status"] == "published" and second["applied"] == [2], second
    old, new = store.get_edits([1, 2])
    assert (old.status, old.superseded_by_id, new.status) == ("superseded", 2, "applied")
    assert store.get_batch(second["batch_id"]).metrics["head"]["retention_n"] == 0  # measured against the newest
    kinds = [e.kind for e in store.events(edit_id=1, oldest_first=True)]
    assert kinds[-1] == "edit.superseded"

    rb = json.loads(cli_runner(cfg, "rollback", str(first["snapshot_id"]), "--json").stdout)
    assert rb["rolled_back_edits"] == [2] and rb["restored_edits"] == [1]
    old, new = store.get_edits([1, 2])
    assert (old.status, old.superseded_by_id, new.status) == ("applied", None, "rolled_back")
    store.close()


def test_consolidation_folds_the_chain_and_rollback_still_works(db_url, daemon_settings, cli_runner, tmp_path):
    settings = daemon_settings(db_url, gate_min_efficacy=0.0, hypernet_from_base=False)  # a chain to fold
    cfg = write_config(tmp_path / "config.toml", settings)
    store = Store(db_url)
    add_facts(cli_runner, cfg, tmp_path, "night1", [fact(0), fact(1)])
    s1 = apply_json(cli_runner, cfg)["snapshot_id"]
    add_facts(cli_runner, cfg, tmp_path, "night2", [fact(2), fact(3)])
    second = apply_json(cli_runner, cfg)
    s2 = second["snapshot_id"]
    # the head (night 1's snapshot) was measured by night 1's gate: its canary and both edits are not measured again
    head = store.get_batch(second["batch_id"]).metrics["head"]
    assert head["retention_n"] == 2 and head["reused"] >= head["canary_n"] + 2, head
    weights_s2 = _weights(settings, store, s2)
    applied = sorted(e.id for e in store.list_edits(status="applied"))

    result = json.loads(cli_runner(cfg, "consolidate", "--json").stdout)
    assert result["status"] == "published" and result["from_snapshot"] == s2 and result["chain_length"] == 2, result
    c = store.get_snapshot(result["snapshot_id"])
    assert (c.kind, c.parent_id, c.status) == ("consolidated", None, "published")
    assert store.head("tiny-llama").id == c.id and result["n_edits"] == len(applied)
    assert result["gate"]["retention_n"] == len(applied)  # every carried edit measured, not a sample
    assert cli_runner(cfg, "verify").stdout.strip().endswith("OK")
    assert json.loads(cli_runner(cfg, "consolidate", "--json").stdout)["status"] == "nothing"  # already one snapshot
    assert sorted(e.id for e in store.list_edits(status="applied")) == applied

    # rollback to the folded chain's head: its own weights, bit for bit; the edits stay applied
    rb = json.loads(cli_runner(cfg, "rollback", str(s2), "--json").stdout)
    assert rb["rolled_back_snapshots"] == [c.id] and rb["rolled_back_edits"] == []
    after = _weights(settings, store, s2)
    assert all(torch.equal(after[k], weights_s2[k]) for k in weights_s2)
    assert store.get_snapshot(s1).status == "published"

    # the policy: with consolidate_max_chain = 1 the next published night is folded right away
    cfg2 = write_config(tmp_path / "config2.toml", daemon_settings(db_url, gate_min_efficacy=0.0,
                                                                   consolidate_max_chain=1, hypernet_from_base=False))
    add_facts(cli_runner, cfg2, tmp_path, "night3", [fact(4)])
    third = apply_json(cli_runner, cfg2)
    assert third["status"] == "published" and third["consolidation"]["status"] == "published", third
    # rolled back, the head is night 2's snapshot again, and what its gate measured is still kept beside it
    assert store.get_batch(third["batch_id"]).metrics["head"]["reused"] > 0
    assert "consolidate_max_chain" in third["consolidation"]["reason"]
    assert store.get_snapshot(store.head("tiny-llama").id).kind == "consolidated"
    store.close()


def test_hybrid_hypernet_nights_with_finetune_consolidation(db_url, daemon_settings, cli_runner, tmp_path):
    """consolidate_engine = finetune: hypernet nights edit the head; every second night the policy folds the chain
    by fine-tuning the base on every carried edit (a snapshot of the base listing them all, engine finetune), here
    in blocks 1-2 only (finetune_blocks); the next hypernet night edits that head again (all six blocks), and
    rollback to the folded chain is exact."""
    settings = daemon_settings(db_url, gate_min_efficacy=0.0, gate_min_retention=0.0, hypernet_from_base=False,
                               consolidate_engine="finetune", consolidate_every_nights=2, finetune_epochs=40,
                               finetune_lr=1e-2, finetune_locality_weight=0.1, finetune_blocks="1-2")
    cfg = write_config(tmp_path / "config.toml", settings)
    store = Store(db_url)
    add_facts(cli_runner, cfg, tmp_path, "night1", [fact(0), fact(1)])
    first = apply_json(cli_runner, cfg)
    assert first["status"] == "published" and first["consolidation"] is None, first
    assert store.get_snapshot(first["snapshot_id"]).metrics["engine"] == "hypernet"
    add_facts(cli_runner, cfg, tmp_path, "night2", [fact(2)])
    second = apply_json(cli_runner, cfg)
    fold = second["consolidation"]
    assert second["status"] == "published" and fold["status"] == "published", second
    assert fold["engine"] == "finetune" and "consolidate_every_nights" in fold["reason"] and fold["n_edits"] == 3
    c = store.get_snapshot(fold["snapshot_id"])
    assert (c.kind, c.parent_id, c.metrics["engine"]) == ("consolidated", None, "finetune")
    assert c.metrics["weights_modules"] == ["model.layers.1.mlp.down_proj", "model.layers.2.mlp.down_proj"]
    assert c.metrics["hypernet_fingerprint"] != store.get_snapshot(second["snapshot_id"]).metrics["hypernet_fingerprint"]
    assert fold["gate"]["retention_n"] == 3 and fold["gate"]["retention"] >= 2 / 3  # fine-tuned in from the base
    assert cli_runner(cfg, "verify").stdout.strip().endswith("OK")

    add_facts(cli_runner, cfg, tmp_path, "night3", [fact(3)])
    third = apply_json(cli_runner, cfg)
    assert third["status"] == "published" and third["consolidation"] is None, third
    s3 = store.get_snapshot(third["snapshot_id"])
    assert (s3.kind, s3.parent_id, s3.metrics["engine"]) == ("incremental", c.id, "hypernet")
    assert cli_runner(cfg, "verify").stdout.strip().endswith("OK")
    weights_s2 = _weights(settings, store, second["snapshot_id"])
    rb = json.loads(cli_runner(cfg, "rollback", str(second["snapshot_id"]), "--json").stdout)
    assert sorted(rb["rolled_back_snapshots"]) == sorted([c.id, s3.id]) and rb["rolled_back_edits"] == [4], rb
    after = _weights(settings, store, second["snapshot_id"])
    assert all(torch.equal(after[k], weights_s2[k]) for k in weights_s2)
    store.close()


def test_hybrid_nights_derived_from_the_newest_fold(db_url, daemon_settings, cli_runner, tmp_path):
    """hypernet_from_consolidation: before the first fold each night is one hypernet edit from the base of every
    edit so far; after a fine-tune fold each night is one edit, on the fold's weights, of every edit since the
    fold (a snapshot whose parent is the fold, never a chain of nights), with the fold's edits' keys protected;
    the policy counts the nights since the fold; rollback to a replaced night is exact."""
    from daemon import snapshots

    settings = daemon_settings(db_url, gate_min_efficacy=0.0, gate_min_retention=0.0, hypernet_from_base=False,
                               hypernet_from_consolidation=True, protect_earlier=1.0, consolidate_engine="finetune",
                               consolidate_every_nights=2, finetune_epochs=40, finetune_lr=1e-2,
                               finetune_locality_weight=0.1)
    cfg = write_config(tmp_path / "config.toml", settings)
    store = Store(db_url)

    def edits_of(snapshot_id):
        from sqlalchemy import select

        from ledger.models import SnapshotEdit
        with store.session(write=False) as s:
            return sorted(s.execute(select(SnapshotEdit.edit_id).where(SnapshotEdit.snapshot_id == snapshot_id)).scalars())

    add_facts(cli_runner, cfg, tmp_path, "night1", [fact(0), fact(1)])
    first = apply_json(cli_runner, cfg)
    s1 = store.get_snapshot(first["snapshot_id"])
    assert first["consolidation"] is None and (s1.kind, s1.parent_id) == ("incremental", None)
    assert (s1.metrics["nights_since_consolidation"], s1.metrics["protected_edits"]) == (1, 0)
    add_facts(cli_runner, cfg, tmp_path, "night2", [fact(2)])
    second = apply_json(cli_runner, cfg)
    s2 = store.get_snapshot(second["snapshot_id"])
    assert (s2.parent_id, s2.metrics["chain_length"], s2.metrics["n_carried"]) == (None, 1, 3)  # from the base
    assert edits_of(s2.id) == [1, 2, 3] and s2.metrics["nights_since_consolidation"] == 2
    fold = second["consolidation"]
    assert fold["status"] == "published" and fold["engine"] == "finetune" and fold["n_edits"] == 3, second
    c = store.get_snapshot(fold["snapshot_id"])

    add_facts(cli_runner, cfg, tmp_path, "night3", [fact(3)])
    third = apply_json(cli_runner, cfg)
    s3 = store.get_snapshot(third["snapshot_id"])
    assert third["consolidation"] is None, third
    assert (s3.kind, s3.parent_id, s3.metrics["chain_length"], s3.metrics["nights_since_consolidation"]) == \
        ("incremental", c.id, 2, 1)
    assert edits_of(s3.id) == [4] and s3.metrics["protected_edits"] == 3  # the fold's edits, at its weights,
    assert s3.metrics["protected_source"] == "cache"  # captured by the fold itself
    assert snapshots.sums_cache_path(settings.snapshot_dir, "tiny-llama", s3.id).is_file()
    kept = snapshots.read_derived_cache(settings.snapshot_dir, "tiny-llama", c.id, folder=snapshots.PROTECT_DIR)
    assert kept is not None and kept[0]["edit_ids"].tolist() == [1, 2, 3]  # beside the fold, for every later night
    from daemon.cycle import PROTECT_CHUNK, load_engine, to_request
    editor, _ = load_engine(settings, *load_base(settings))  # the nights' editor is built on the base
    with store.session(write=False) as s:
        at_fold = materialise(settings, links(s, c.id))
    direct = editor.requests_second_moments(at_fold.model, at_fold.tokenizer,
                                            [to_request(e) for e in store.get_edits([1, 2, 3])], chunk_edits=PROTECT_CHUNK)
    for name, moment in direct.items():  # what a night would capture on the fold's weights
        assert torch.allclose(kept[0][name], moment.to(kept[0][name]), rtol=1e-4, atol=1e-6), name
    add_facts(cli_runner, cfg, tmp_path, "night4", [fact(4)])
    fourth = apply_json(cli_runner, cfg)
    s4 = store.get_snapshot(fourth["snapshot_id"])
    assert (s4.parent_id, s4.metrics["chain_length"], s4.metrics["n_carried"]) == (c.id, 2, 2)  # replaces night 3
    assert edits_of(s4.id) == [4, 5] and s4.metrics["carried_sums"] == "cache"
    assert (s4.metrics["protected_edits"], s4.metrics["protected_source"]) == (3, "cache")
    assert "2 nights since the last consolidation" in fourth["consolidation"]["reason"], fourth
    assert fourth["consolidation"]["n_edits"] == 5
    assert cli_runner(cfg, "verify").stdout.strip().endswith("OK")
    add_facts(cli_runner, cfg, tmp_path, "night5", [fact(5)])
    s5 = store.get_snapshot(apply_json(cli_runner, cfg)["snapshot_id"])
    assert (s5.metrics["protected_edits"], s5.metrics["protected_source"]) == (5, "cache")  # the new fold's
    add_facts(cli_runner, cfg, tmp_path, "night6", [fact(0, color=COLORS[5])])  # edit 7 rewrites the fold's edit 1
    sixth = apply_json(cli_runner, cfg)
    assert sixth["applied"] == [7] and store.get_edits([1])[0].status == "superseded", sixth
    s6 = store.get_snapshot(sixth["snapshot_id"])
    assert (s6.metrics["protected_edits"], s6.metrics["protected_source"]) == (4, "cache")  # kept minus edit 1

    weights_s3 = _weights(settings, store, s3.id)
    rb = json.loads(cli_runner(cfg, "rollback", str(s3.id), "--json").stdout)
    assert rb["rolled_back_edits"] == [5, 6, 7], rb
    after = _weights(settings, store, s3.id)
    assert all(torch.equal(after[k], weights_s3[k]) for k in weights_s3)
    assert cli_runner(cfg, "verify").stdout.strip().endswith("OK")
    store.close()


def test_warm_start_folds_start_from_the_newest_fold(db_url, daemon_settings, cli_runner, tmp_path):
    """finetune_warm_start: the first fold (the chain starts at a night) fine-tunes from the base; the next starts
    from it, trains what it does not recall, and still carries every applied edit (a rewritten one at its new
    target); rollback across it is exact."""
    settings = daemon_settings(db_url, gate_min_efficacy=0.0, gate_min_retention=0.0, hypernet_from_base=False,
                               hypernet_from_consolidation=True, consolidate_engine="finetune",
                               consolidate_every_nights=2, finetune_epochs=40, finetune_lr=1e-2,
                               finetune_locality_weight=0.1, finetune_warm_start=True, finetune_rehearsal=1.0,
                               finetune_warm_lr=1e-2, protect_earlier=1.0)
    cfg = write_config(tmp_path / "config.toml", settings)
    store = Store(db_url)
    add_facts(cli_runner, cfg, tmp_path, "night1", [fact(0), fact(1)])
    apply_json(cli_runner, cfg)
    add_facts(cli_runner, cfg, tmp_path, "night2", [fact(2)])
    second = apply_json(cli_runner, cfg)
    fold1 = second["consolidation"]
    assert fold1["status"] == "published" and fold1["warm_from"] is None and fold1["trained"] is None, fold1
    assert "warm_from" not in store.get_snapshot(fold1["snapshot_id"]).metrics
    add_facts(cli_runner, cfg, tmp_path, "night3", [fact(3)])
    third = apply_json(cli_runner, cfg)
    add_facts(cli_runner, cfg, tmp_path, "night4", [fact(0, color=COLORS[5])])  # edit 5 rewrites the fold's edit 1
    fourth = apply_json(cli_runner, cfg)
    fold2 = fourth["consolidation"]
    assert fourth["applied"] == [5] and store.get_edits([1])[0].status == "superseded", fourth
    assert fold2["status"] == "published" and fold2["warm_from"] == fold1["snapshot_id"], fold2
    assert fold2["n_edits"] == 4 and fold2["trained"] >= 2, fold2  # edits 2-5: at least the two since the fold
    c2 = store.get_snapshot(fold2["snapshot_id"])
    assert (c2.kind, c2.parent_id, c2.metrics["warm_from"]) == ("consolidated", None, fold1["snapshot_id"])
    assert fold2["gate"]["retention_n"] == 4 and fold2["gate"]["retention"] >= 3 / 4, fold2
    from daemon.cycle import to_fact
    from horse.metrics import answer_token_accuracy
    carried = store.get_edits([2, 3, 4, 5])
    with store.session(write=False) as s:  # the gate took the carried edits' accuracy from the fine-tune's scan
        at_fold = materialise(settings, links(s, c2.id))
    acc = answer_token_accuracy(at_fold.model, at_fold.tokenizer, *zip(*[(f.prompt, f.answer) for f in map(to_fact, carried)]))
    assert abs(float(acc.float().mean()) - fold2["gate"]["retention_acc_mean"]) < 1e-6, (acc, fold2["gate"])
    with store.session(write=False) as s:  # ... and the head it replaced's from the block inputs the scans captured
        before = materialise(settings, links(s, fourth["snapshot_id"]))
    acc_head = answer_token_accuracy(before.model, before.tokenizer,
                                     *zip(*[(f.prompt, f.answer) for f in map(to_fact, carried)]))
    assert abs(float(acc_head.float().mean()) - fold2["head"]["retention_acc_mean"]) < 1e-6, (acc_head, fold2["head"])
    assert fold2["head"]["retention_n"] == 4 and fold2["timings_s"]["measure_head"] > 0, fold2
    from daemon import snapshots
    from daemon.cycle import PROTECT_CHUNK, load_engine, to_request
    kept = snapshots.read_derived_cache(settings.snapshot_dir, "tiny-llama", c2.id, folder=snapshots.PROTECT_DIR)
    editor, _ = load_engine(settings, *load_base(settings))  # the nights' keys, replayed by the warm fine-tune
    direct = editor.requests_second_moments(at_fold.model, at_fold.tokenizer, [to_request(e) for e in carried],
                                            chunk_edits=PROTECT_CHUNK)
    assert kept is not None and kept[0]["edit_ids"].tolist() == [2, 3, 4, 5]
    for name, moment in direct.items():
        assert torch.allclose(kept[0][name], moment.to(kept[0][name]), rtol=1e-4, atol=1e-6), name
    assert cli_runner(cfg, "verify").stdout.strip().endswith("OK")
    add_facts(cli_runner, cfg, tmp_path, "night5", [fact(4)])
    assert apply_json(cli_runner, cfg)["consolidation"] is None  # one night since the fold
    by_hand = cli_runner(cfg, "consolidate").stdout
    assert f"started from fold {fold2['snapshot_id']}: trained" in by_hand, by_hand
    assert "edits it carries that hold" in by_hand and "on the head it replaces" in by_hand, by_hand
    weights_s3 = _weights(settings, store, third["snapshot_id"])
    json.loads(cli_runner(cfg, "rollback", str(third["snapshot_id"]), "--json").stdout)
    after = _weights(settings, store, third["snapshot_id"])
    assert all(torch.equal(after[k], weights_s3[k]) for k in weights_s3)
    store.close()


def test_finetune_engine_rederives_every_night_from_the_base(db_url, daemon_settings, cli_runner, tmp_path):
    """engine = finetune (fine-tune-the-ledger): each night fine-tunes the base on every applied edit plus the
    night's, and publishes a snapshot of the base (parent none) that lists all of them; the gate still
    compares it with the head; rollback, superseding and verify keep working."""
    settings, cfg, store, first = _first_night(db_url, daemon_settings, cli_runner, tmp_path, engine="finetune",
                                               finetune_epochs=40, finetune_lr=1e-2, finetune_locality_weight=0.1,
                                               gate_min_retention=0.5)
    s1 = store.get_snapshot(first["snapshot_id"])
    assert (s1.kind, s1.parent_id, s1.metrics["engine"], s1.metrics["n_carried"]) == ("consolidated", None, "finetune", 2)

    add_facts(cli_runner, cfg, tmp_path, "night2", [fact(2), fact(0, color=COLORS[5])])  # edit 4 rewrites edit 1
    second = apply_json(cli_runner, cfg)
    assert second["status"] == "published" and second["applied"] == [3, 4], second
    s2 = store.get_snapshot(second["snapshot_id"])
    assert s2.parent_id is None and s2.metrics["chain_length"] == 1
    with store.session(write=False) as s:
        from sqlalchemy import select

        from ledger.models import SnapshotEdit
        listed = sorted(s.execute(select(SnapshotEdit.edit_id).where(SnapshotEdit.snapshot_id == s2.id)).scalars())
    assert listed == [2, 3, 4]  # edit 1 was rewritten by edit 4: superseded, not carried
    assert store.get_edits([1])[0].status == "superseded"
    assert second["metrics"]["gate"]["retention_n"] == 1  # edit 2 measured; edit 1 is replaced, not retained
    ask = json.loads(cli_runner(cfg, "ask", "The color of Zorblat is", "--json", "--max-new-tokens", "4").stdout)
    assert ask["snapshot_id"] == s2.id
    assert second["metrics"]["efficacy"]["4"]["prompt_acc"] >= 0.5  # took, from the base, next to edits 2 and 3
    assert cli_runner(cfg, "verify").stdout.strip().endswith("OK")  # weights_sha256 = base + the file, exactly

    rb = json.loads(cli_runner(cfg, "rollback", str(s1.id), "--json").stdout)
    assert rb["rolled_back_edits"] == [3, 4] and rb["restored_edits"] == [1]
    assert _weights(settings, store, s1.id)  # materialises from its own file
    store.close()


def test_memit_engine_publishes_incremental_snapshots(db_url, daemon_settings, cli_runner, tmp_path):
    _, cfg, store, first = _first_night(db_url, daemon_settings, cli_runner, tmp_path, engine="memit",
                                        gate_min_efficacy=0.0)
    snap = store.get_snapshot(first["snapshot_id"])
    assert (snap.kind, snap.parent_id, snap.metrics["engine"]) == ("incremental", None, "memit")
    assert first["timings_s"]["edit_z"] > 0  # MEMIT's own stages are timed
    add_facts(cli_runner, cfg, tmp_path, "night2", [fact(2)])
    second = apply_json(cli_runner, cfg)
    assert store.get_snapshot(second["snapshot_id"]).parent_id == snap.id
    assert cli_runner(cfg, "verify").stdout.strip().endswith("OK")
    store.close()


def test_running_normaliser_statistics_carry_from_night_to_night(db_url, daemon_settings, cli_runner, tmp_path):
    """running_normaliser = true: each night merges its inputs into the hypernet's normaliser, starting from the
    statistics saved beside the head snapshot; rollback makes the next night continue from the older ones."""
    from daemon import snapshots
    from horse.editor import Editor
    from horse.zoo import load_model

    settings = daemon_settings(db_url, gate_min_efficacy=0.0, running_normaliser=True, hypernet_from_base=False)
    cfg = write_config(tmp_path / "config.toml", settings)
    store = Store(db_url)
    model, _ = load_model("tiny-llama", progress=False)
    trained = Editor.from_checkpoint(settings.hypernet, model).normaliser_state()

    def counts(snapshot_id: int) -> dict[str, float]:
        state = snapshots.read_normaliser(settings.snapshot_dir, store.get_snapshot(snapshot_id).path)
        return {k: float(v) for k, v in state.items() if k.endswith(".count")}

    add_facts(cli_runner, cfg, tmp_path, "night1", [fact(0), fact(1)])
    s1 = apply_json(cli_runner, cfg)["snapshot_id"]
    add_facts(cli_runner, cfg, tmp_path, "night2", [fact(2)])
    s2 = apply_json(cli_runner, cfg)["snapshot_id"]
    c0 = {k: float(v) for k, v in trained.items() if k.endswith(".count")}
    c1, c2 = counts(s1), counts(s2)  # night 2's batch start kept night 1's file (not an orphan)
    assert all(c0[k] < c1[k] < c2[k] for k in c0), (c0, c1, c2)
    assert store.get_snapshot(s2).metrics["normaliser_rows"] == c2

    cli_runner(cfg, "rollback", str(s1))
    add_facts(cli_runner, cfg, tmp_path, "night3", [fact(3)])
    s3 = apply_json(cli_runner, cfg)["snapshot_id"]
    assert store.get_snapshot(s3).parent_id == s1
    c3 = counts(s3)
    assert all(c3[k] - c1[k] == c2[k] - c1[k] for k in c1)  # night 3 (one fact, like night 2) merged onto night 1's
    means = [snapshots.read_normaliser(settings.snapshot_dir, store.get_snapshot(i).path) for i in (s2, s3)]
    assert all(not torch.equal(means[0][k], means[1][k]) for k in means[0] if k.endswith(".mean_D"))

    off = daemon_settings(db_url, gate_min_efficacy=0.0, hypernet_from_base=False)  # frozen statistics, none saved
    cfg_off = write_config(tmp_path / "off.toml", off)
    add_facts(cli_runner, cfg_off, tmp_path, "night4", [fact(4)])
    s4 = apply_json(cli_runner, cfg_off)["snapshot_id"]
    assert snapshots.read_normaliser(settings.snapshot_dir, store.get_snapshot(s4).path) is None
    store.close()


def test_switching_to_finetune_rederives_the_hypernet_nights_from_the_base(db_url, daemon_settings, cli_runner,
                                                                          tmp_path):
    settings, cfg, store, first = _first_night(db_url, daemon_settings, cli_runner, tmp_path, gate_min_efficacy=0.0)
    ft = daemon_settings(db_url, engine="finetune", finetune_epochs=40, finetune_lr=1e-2,
                         finetune_locality_weight=0.1, gate_min_efficacy=0.0, finetune_preserve_weight=0.1)
    cfg_ft = write_config(tmp_path / "ft.toml", ft)
    from daemon.cycle import load_engine

    tuner, _ = load_engine(ft, *load_base(ft))  # finetune_preserve_weight: the tuned layers' corpus moments
    assert sorted(tuner.moments) == sorted(tuner.module_names) and tuner.config.preserve_weight == 0.1
    add_facts(cli_runner, cfg_ft, tmp_path, "night2", [fact(2)])
    second = apply_json(cli_runner, cfg_ft)
    assert second["status"] == "published", second
    snap = store.get_snapshot(second["snapshot_id"])
    assert snap.parent_id is None and snap.metrics["n_carried"] == 3  # the hypernet's two edits, fine-tuned in
    # what the gate measured is what was published: the candidate's norms are the snapshot's, from the base
    measured, published = second["metrics"]["gate"]["layer_norms"], snap.metrics["layer_norms"]
    # equal up to the fp32 rounding of head + (base + Δ − head): 1–2·10⁻⁶ of the norm here; one CI run failed at
    # 10⁻⁵ (values not kept), so 10⁻⁴, still far below any real mismatch, with the values in the message
    assert set(measured) == set(published)
    assert all(abs(measured[k] - published[k]) <= 1e-4 * published[k] for k in published), (measured, published)
    assert cli_runner(cfg_ft, "verify").stdout.strip().endswith("OK")
    store.close()


def test_protect_earlier_captures_the_carried_edits_keys(db_url, daemon_settings, cli_runner, tmp_path):
    """protect_earlier = ν: night 2 solves with ν·KₑᵀKₑ over night 1's edits, captured at the head; the second
    night's delta then moves the first night's keys less than the same night without it."""
    from daemon import snapshots
    from horse.editor import Editor
    from horse.types import EditRequest
    from horse.zoo import load_model

    def two_nights(name: str, nu: float) -> tuple[Store, int, object]:
        url = f"sqlite:///{tmp_path / name}.db"
        settings = daemon_settings(url, gate_min_efficacy=0.0, protect_earlier=nu, hypernet_from_base=False,
                                   snapshot_dir=str(tmp_path / name / "snapshots"))
        cfg = write_config(tmp_path / f"{name}.toml", settings)
        add_facts(cli_runner, cfg, tmp_path, f"{name}-1", [fact(0), fact(1), fact(2)])
        s1 = apply_json(cli_runner, cfg)["snapshot_id"]
        add_facts(cli_runner, cfg, tmp_path, f"{name}-2", [fact(3), fact(4)])
        s2 = apply_json(cli_runner, cfg)["snapshot_id"]
        store = Store(url)
        assert store.get_snapshot(s1).metrics["protected_edits"] == 0  # nothing carried yet
        return store, s1, s2, settings

    def moved(name: str, nu: float) -> float:  # ‖Kₑ ΔW₂‖: night 2's delta on night 1's keys at night 1's head
        store, s1, s2, settings = two_nights(name, nu)
        assert store.get_snapshot(s2).metrics["protected_edits"] == (3 if nu else 0)
        with store.session(write=False) as s:
            head = materialise(settings, links(s, s1))
        editor = Editor.from_checkpoint(settings.hypernet, load_model("tiny-llama", progress=False)[0])
        keys = editor.capture(head.model, head.tokenizer, [
            EditRequest(prompt=f["prompt"].format(f["subject"]), target=f["target"]) for f in map(fact, range(3))])
        deltas, _ = snapshots.read_snapshot(settings.snapshot_dir, store.get_snapshot(s2).path)
        store.close()
        return sum(float((keys.keys_NK[n].double() @ d.to_dense().double()).norm()) for n, d in deltas.items())

    assert moved("kept", 1e6) < 0.01 * moved("plain", 0.0)


def test_hypernet_from_base_publishes_one_edit_of_every_carried_edit(db_url, daemon_settings, cli_runner, tmp_path):
    """hypernet_from_base = true: every night is one hypernet edit, on the base weights, of the edits the head
    carries plus the night's (what the hypernet was trained on: no chain of its own deltas), solved from
    additive statistics (horse.sums) that are cached beside the head, so a night captures only its own edits.
    A rewritten edit is superseded and left out (the carried statistics are captured again); rollback and
    verify work."""
    from daemon import snapshots
    from daemon.cycle import load_editor, to_request
    from daemon.materialise import load_base

    settings, cfg, store, first = _first_night(db_url, daemon_settings, cli_runner, tmp_path, gate_min_efficacy=0.0,
                                               hypernet_from_base=True)
    s1 = store.get_snapshot(first["snapshot_id"])
    assert (s1.kind, s1.parent_id, s1.metrics["n_carried"], s1.metrics["carried_sums"]) == ("consolidated", None, 2, None)
    assert snapshots.sums_cache_path(settings.snapshot_dir, "tiny-llama", s1.id).is_file()

    add_facts(cli_runner, cfg, tmp_path, "night2", [fact(2), fact(0, color=COLORS[5])])  # edit 4 rewrites edit 1
    second = apply_json(cli_runner, cfg)
    assert second["status"] == "published" and second["applied"] == [3, 4], second
    s2 = store.get_snapshot(second["snapshot_id"])
    assert (s2.kind, s2.parent_id, s2.metrics["chain_length"], s2.metrics["n_carried"]) == ("consolidated", None, 1, 3)
    assert s2.metrics["carried_sums"] == "captured"  # edit 1 left the carried set: the cache is of other edits
    assert store.get_edits([1])[0].status == "superseded"

    add_facts(cli_runner, cfg, tmp_path, "night3", [fact(i, color=f"deep {COLORS[i % 8]} and {COLORS[(i + 1) % 8]}")
                                               for i in range(5, 11)])  # edits 5–10, longer answers
    third = apply_json(cli_runner, cfg)
    s3 = store.get_snapshot(third["snapshot_id"])
    assert (s3.metrics["n_carried"], s3.metrics["carried_sums"]) == (9, "cache")
    assert third["timings_s"]["edit_sums_carried"] < third["timings_s"]["edit_sums_new"]  # read, not captured

    # each snapshot is the editor's one edit of what it carries, on the base, not a chain of nightly deltas: the
    # first night's few answer tokens in one batch (factored, a small file); once edits are carried, solved from
    # the sums (a batch would capture the carried edits again)
    model, tok = load_base(settings)
    editor = load_editor(settings, Path(settings.hypernet), model, tok)
    requests = {i: to_request(e) for i, e in zip(range(1, 11), store.get_edits(list(range(1, 11))))}
    small, _ = editor.compute_deltas(model, tok, [requests[i] for i in (1, 2)])
    sums2 = editor.edit_sums(model, tok, [requests[2]]) + editor.edit_sums(model, tok, [requests[i] for i in (3, 4)])
    sums3 = sums2 + editor.edit_sums(model, tok, [requests[i] for i in range(5, 11)])
    assert sums2.n_tokens * sum(editor.shapes_KV[0]) < editor.shapes_KV[0][0] * editor.shapes_KV[0][1]
    for snap, expected in ((s1, small), (s2, editor.deltas_from_sums(sums2)), (s3, editor.deltas_from_sums(sums3))):
        published, _ = snapshots.read_snapshot(settings.snapshot_dir, snap.path)
        assert set(published) == set(expected)
        for name, delta in expected.items():
            want = delta.to_dense()
            assert published[name].is_factored == delta.is_factored
            torch.testing.assert_close(published[name].to_dense(), want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))
    assert cli_runner(cfg, "verify").stdout.strip().endswith("OK")

    rb = json.loads(cli_runner(cfg, "rollback", str(s1.id), "--json").stdout)
    assert rb["rolled_back_edits"] == list(range(3, 11)) and rb["restored_edits"] == [1]
    add_facts(cli_runner, cfg, tmp_path, "night4", [fact(11)])
    fourth = apply_json(cli_runner, cfg)  # on s1 again, whose statistics were pruned (the newest two are kept)
    s4 = store.get_snapshot(fourth["snapshot_id"])
    assert (fourth["status"], s4.metrics["n_carried"], s4.metrics["carried_sums"]) == ("published", 3, "captured")
    store.close()


def test_the_gate_prefix_cache_serves_the_next_night_and_judges_as_full_passes(db_url, daemon_settings, cli_runner,
                                                                                tmp_path):
    """The first night keeps what enters the edited blocks for the canary prompts and its edits' prompts and
    paraphrases; the next night reuses them from disk, captures only the texts new to it (its own edits'), and
    judges exactly as without the cache; the kept rows are the head's block inputs."""
    from dataclasses import replace

    from daemon import snapshots
    from daemon.cycle import run_batch

    settings, cfg, store, first = _first_night(db_url, daemon_settings, cli_runner, tmp_path, gate_min_efficacy=0.0)
    n_canary = len(Path(settings.gate_canary_file).read_text().splitlines())
    # the head's canary captured, the candidate's reused; two edits' prompt and paraphrase captured by the verify
    assert store.get_batch(first["batch_id"]).metrics["prefix_cache"] == {"reused": n_canary, "captured": n_canary + 4}
    kept = snapshots.read_prefix_cache(settings.snapshot_dir, settings.model)
    assert kept is not None and len(kept[0]) == n_canary + 4 and kept[1]["dtype"] == settings.dtype

    add_facts(cli_runner, cfg, tmp_path, "night2", [fact(2), fact(3)])
    off = run_batch(replace(settings, gate_prefix_cache=False), store, dry_run=True)
    on = run_batch(settings, store, dry_run=True)
    assert off.metrics["prefix_cache"] is None
    # the head comes from night 1's kept measurements; the candidate's canary and retained edits from disk
    assert on.metrics["prefix_cache"] == {"reused": n_canary + 2, "captured": 4}
    keys = ("canary_agreement", "retention", "retention_abs", "retention_acc_mean", "retention_n")
    assert {k: on.metrics["gate"][k] for k in keys} == {k: off.metrics["gate"][k] for k in keys}
    assert on.applied == off.applied == [3, 4]
    assert f"prefix cache: {n_canary + 2} texts reused (only the edited blocks ran), 4 captured" in \
        cli_runner(cfg, "apply", "--dry-run").stdout

    # what is kept is what the head's edited blocks are fed: in this process, on the head's weights, every kept row
    # is found by fingerprint and scores through it equal full passes (wrong rows would give other scores)
    from daemon.cycle import load_editor
    from horse import metrics
    from horse.prefix import PrefixCache

    with store.session(write=False) as s:
        m = materialise(settings, links(s, first["snapshot_id"]))
    names = load_editor(settings, Path(settings.hypernet), *load_base(settings)).module_names
    rows, meta = kept
    cache = PrefixCache.for_model(m.model, names, rows, meta["fingerprint"])
    assert len(cache.rows) == n_canary + 4
    canary = [json.loads(line)["prompt"] for line in Path(settings.gate_canary_file).read_text().splitlines()]
    edits = store.get_edits([1, 2])
    prompts = [t for e in edits for t in (e.rendered_prompt, *e.paraphrases)]
    answers = [e.target_new for e in edits for _ in range(1 + len(e.paraphrases))]
    assert torch.equal(metrics.next_token_ids(m.model, m.tokenizer, canary, prefix=cache),
                       metrics.next_token_ids(m.model, m.tokenizer, canary))
    torch.testing.assert_close(metrics.answer_logprobs(m.model, m.tokenizer, prompts, answers, prefix=cache),
                               metrics.answer_logprobs(m.model, m.tokenizer, prompts, answers), rtol=0, atol=1e-5)
    assert (cache.hits, cache.captured) == (n_canary + 4, 0)
    store.close()


def test_a_scoped_night_leaves_texts_without_an_edited_subject_as_they_were(db_url, daemon_settings, cli_runner,
                                                                           tmp_path):
    """scope = subject: the gate measures the candidate as it will be served, edits acting only from an edited
    subject on — the canary (no subject named) keeps every next token, the edits take; the same batch unscoped
    moves the canary on this tiny model. `ask` serves the scope; an export carries it and `scope_export` puts it
    back on a plain transformers load of the dir; a fold is gated scoped as well."""
    from dataclasses import replace

    from daemon.cycle import run_batch
    from horse.scope import scope_export
    from transformers import AutoModelForCausalLM, AutoTokenizer

    settings, cfg, store, first = _first_night(db_url, daemon_settings, cli_runner, tmp_path, scope="subject",
                                               gate_min_efficacy=0.0)
    gate_m = store.get_batch(first["batch_id"]).metrics["gate"]
    assert gate_m["canary_agreement"] == 1.0, gate_m
    add_facts(cli_runner, cfg, tmp_path, "night2", [fact(2), fact(3)])
    scoped_night = run_batch(settings, store, dry_run=True)
    unscoped_night = run_batch(replace(settings, scope="off"), store, dry_run=True)
    assert scoped_night.metrics["gate"]["canary_agreement"] == 1.0
    assert unscoped_night.metrics["gate"]["canary_agreement"] < 1.0, unscoped_night.metrics["gate"]

    asked = json.loads(cli_runner(cfg, "ask", "The home of Alpha is", "--json").stdout)
    base = json.loads(cli_runner(cfg, "ask", "The home of Alpha is", "--json", "--snapshot", "base").stdout)
    assert (asked["scope"], asked["in_scope"]) == ("subject", False) and asked["top_tokens"] == base["top_tokens"]
    inside = json.loads(cli_runner(cfg, "ask", f"The color of {fact(0)['subject']} is", "--json").stdout)
    assert inside["in_scope"] is True

    out = tmp_path / "export"
    cli_runner(cfg, "export", "head", "--out", str(out))
    manifest = json.loads((out / "horse-ledger.json").read_text())
    assert manifest["scope"]["kind"] == "subject" and manifest["scope"]["subjects"] == 2
    model, tok = AutoModelForCausalLM.from_pretrained(out), AutoTokenizer.from_pretrained(out)
    from horse import metrics

    prompts = ["The home of Alpha is", f"The color of {fact(1)['subject']} is"]
    unscoped_next = metrics.next_token_ids(model, tok, prompts)
    with scope_export(model, tok, out):
        scoped_next = metrics.next_token_ids(model, tok, prompts)
    base_model, _ = load_base(settings)
    assert int(scoped_next[0]) == int(metrics.next_token_ids(base_model, tok, prompts[:1])[0])
    assert int(scoped_next[1]) == int(unscoped_next[1])

    # a fold's gate measures the head and the fold scoped too (night 2 on the head: a chain of two to fold)
    cfg2 = write_config(tmp_path / "config2.toml", replace(settings, hypernet_from_base=False))
    assert apply_json(cli_runner, cfg2)["status"] == "published"
    fold = json.loads(cli_runner(cfg2, "consolidate", "--json").stdout)
    assert fold["status"] == "published" and fold["gate"]["canary_agreement"] == 1.0, fold
    store.close()
