"""ledger/store.py on both backends: adding, idempotency, superseding, claims, sweeps, queries, heads."""
from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import func, select, text, update
from sqlalchemy.exc import DBAPIError

from ledger.errors import DatabaseUnavailable, EditNotFound, ProtectedFactNotFound, SnapshotNotFound
from ledger.models import Batch, Edit, Event, Snapshot, SnapshotEdit, utcnow
from ledger.status import EditStatus, transition
from ledger.store import Store, set_head


def test_add_and_read_back(store, edit_factory):
    spec = edit_factory(subject="Danielle Darrieux", paraphrases=["Danielle Darrieux speaks"], source="wiki",
                        author="alice", note="n")
    (r,) = store.add_edits([spec], actor="cli:alice")
    assert r.created and r.superseded_id is None
    e = store.get_edit(r.id)
    assert (e.subject, e.target_new, e.target_true, e.paraphrases) == ("Danielle Darrieux", "English", "French",
                                                                       ["Danielle Darrieux speaks"])
    assert (e.source, e.author, e.note, e.status, e.attempts) == ("wiki", "alice", "n", "pending", 0)
    assert e.rendered_prompt == "The mother tongue of Danielle Darrieux is"
    assert e.submitted_at.tzinfo is not None and abs(e.submitted_at - datetime.now(UTC)) < timedelta(minutes=1)
    (ev,) = store.events(edit_id=r.id)
    assert (ev.kind, ev.actor) == ("edit.created", "cli:alice")


def test_same_fact_while_active_is_idempotent(store, edit_factory):
    spec = edit_factory()
    (first,) = store.add_edits([spec], actor="t")
    (again,) = store.add_edits([spec], actor="t")
    assert (again.id, again.created) == (first.id, False)
    # case and outer whitespace do not make a new fact
    relaxed = edit_factory(subject=spec.subject.upper(), target="  english ")
    assert store.add_edits([relaxed], actor="t")[0].id == first.id
    # once cancelled, the same fact is a new edit
    store.cancel(first.id, actor="t")
    (third,) = store.add_edits([spec], actor="t")
    assert third.created and third.id != first.id
    # within one call too
    a, b = store.add_edits([edit_factory(subject="X"), edit_factory(subject="X")], actor="t")
    assert a.created and (b.id, b.created) == (a.id, False)


def test_new_edit_for_same_question_supersedes_pending_one(store, edit_factory):
    (old,) = store.add_edits([edit_factory(subject="S", target="German")], actor="t")
    (new,) = store.add_edits([edit_factory(subject="S", target="Italian")], actor="t")
    assert new.created and new.superseded_id == old.id
    o, n = store.get_edit(old.id), store.get_edit(new.id)
    assert (o.status, o.superseded_by_id) == ("superseded", new.id)
    assert (n.status, n.supersedes_id) == ("pending", old.id)
    ev = store.events(edit_id=old.id, kind_prefix="edit.superseded")[0]
    assert ev.payload["superseded_by"] == new.id
    # a chain inside one file: each supersedes the one before
    r = store.add_edits([edit_factory(subject="T", target=t) for t in ("A1", "A2", "A3")], actor="t")
    assert [x.superseded_id for x in r] == [None, r[0].id, r[1].id]
    assert [store.get_edit(x.id).status for x in r] == ["superseded", "superseded", "pending"]
    assert store.get_edit(r[0].id).superseded_by_id == r[1].id


def test_claim_batch_takes_oldest_pending(store, edit_factory):
    ids = [r.id for r in store.add_edits([edit_factory() for _ in range(5)], actor="t")]
    store.cancel(ids[0], actor="t")
    b = store.claim_batch(3, base_model="smollm2-135m")
    assert [e.id for e in b.edits] == ids[1:4]
    assert all(e.status == "claimed" and e.attempts == 1 and e.claim_token == b.token and e.batch_id == b.batch_id
               and e.heartbeat_at is not None for e in b.edits)
    batch = store.get_batch(b.batch_id)
    assert (batch.status, batch.n_edits, batch.base_model, batch.token) == ("claimed", 3, "smollm2-135m", b.token)
    assert [e.kind for e in store.events(batch_id=b.batch_id, oldest_first=True)] == ["edit.claimed"] * 3 + ["batch.claimed"]
    b2 = store.claim_batch(10, base_model="m")
    assert [e.id for e in b2.edits] == ids[4:]
    assert store.claim_batch(10, base_model="m") is None
    assert store.last_batch().id == b2.batch_id


def test_heartbeat_sweep_release_retry(store, edit_factory):
    store.add_edits([edit_factory() for _ in range(4)], actor="t")
    b = store.claim_batch(2, base_model="m")
    other = store.claim_batch(2, base_model="m")
    assert store.heartbeat(b.token) == 2
    assert store.sweep_stale(60, actor="daemon") == []
    with store.session() as s:  # age the first batch's heartbeat
        s.execute(update(Edit).where(Edit.claim_token == b.token).values(heartbeat_at=utcnow() - timedelta(hours=2)))
    swept = store.sweep_stale(3600, actor="daemon")
    assert swept == [e.id for e in b.edits]
    assert all(store.get_edit(i).status == "pending" and store.get_edit(i).claim_token is None for i in swept)
    assert store.get_batch(b.batch_id).status == "abandoned"
    assert "stale" in store.events(edit_id=swept[0])[0].reason
    released = store.release_batch(other.token, actor="daemon", reason="shutting down")
    assert released == [e.id for e in other.edits]
    # failed → pending while attempts < max
    b3 = store.claim_batch(1, base_model="m")
    with store.session() as s:
        transition(s, [b3.edits[0].id], "claimed", "failed", actor="daemon", values={"last_error": "boom"})
    attempts = b3.edits[0].attempts  # this edit was claimed before the sweep too
    assert attempts == 2
    assert store.retry_failed(attempts, actor="daemon") == []
    assert store.retry_failed(attempts + 1, actor="daemon") == [b3.edits[0].id]
    assert store.get_edit(b3.edits[0].id).last_error == "boom"


def test_queries(store, edit_factory):
    ids = [r.id for r in store.add_edits([edit_factory(subject=s) for s in ("Alpha", "beta", "100%_x", "Gamma")],
                                         actor="t")]
    store.cancel(ids[0], actor="t")
    assert [e.id for e in store.list_edits()] == ids[::-1]
    assert [e.id for e in store.list_edits(status="pending", limit=2)] == [ids[3], ids[2]]
    assert [e.id for e in store.list_edits(status=["cancelled"])] == [ids[0]]
    assert [e.id for e in store.list_edits(subject="ALP")] == [ids[0]]
    assert [e.id for e in store.list_edits(subject="%_")] == [ids[2]]  # LIKE metacharacters are literal
    assert store.list_edits(since=datetime.now(UTC) + timedelta(days=1)) == []
    assert len(store.list_edits(since=datetime.now(UTC) - timedelta(days=1))) == 4
    counts = store.status_counts()
    assert counts["pending"] == 3 and counts["cancelled"] == 1 and sum(counts.values()) == 4
    assert [e.kind for e in store.events(edit_id=ids[0])] == ["edit.cancelled", "edit.created"]
    assert len(store.events(limit=2)) == 2
    with pytest.raises(EditNotFound, match="no edit has id 999"):
        store.get_edit(999)
    assert [e.id for e in store.get_edits(ids[:2])] == ids[:2]


def test_snapshots_heads_and_chain(store, edit_factory):
    (r,) = store.add_edits([edit_factory()], actor="t")
    assert store.head("m") is None and store.heads() == {}
    with store.session() as s:
        snaps = []
        parent = None
        for i in range(3):
            snap = Snapshot(parent_id=parent, base_model="m", path=f"/x/{i}.safetensors", sha256="0" * 64, bytes=10,
                            created_at=utcnow(), metrics={"cf": 0.9})
            s.add(snap)
            s.flush()
            snaps.append(snap.id)
            parent = snap.id
        s.add(SnapshotEdit(snapshot_id=snaps[-1], edit_id=r.id))
        set_head(s, "m", snaps[-1], actor="daemon")
    assert store.head("m").id == snaps[-1] and store.heads() == {"m": snaps[-1]}
    assert [x.id for x in store.snapshot_chain(snaps[-1])] == snaps
    assert store.snapshot_edit_ids(snaps[-1]) == [r.id]
    assert [e.id for e in store.list_edits(snapshot_id=snaps[-1])] == [r.id]
    assert store.get_snapshot(snaps[0]).kind == "incremental" and store.get_snapshot(snaps[0]).status == "published"
    with pytest.raises(SnapshotNotFound):
        store.snapshot_chain(12345)
    with store.session() as s:
        assert set_head(s, "m", None, actor="daemon") == snaps[-1]
    assert store.head("m") is None
    assert store.events(kind_prefix="head.")[0].payload == {"base_model": "m", "from": snaps[-1], "to": None}


def test_protected_facts(store):
    a = store.add_protected(prompt="The capital of {} is", subject="France", target="Paris", note="n", actor="t")
    b = store.add_protected(prompt="Water boils at", target="100 °C", actor="t")
    assert a.rendered_prompt == "The capital of France is"
    assert [p.id for p in store.list_protected()] == [a.id, b.id]
    store.remove_protected(a.id, actor="t")
    assert [p.id for p in store.list_protected()] == [b.id]
    with pytest.raises(ProtectedFactNotFound):
        store.remove_protected(a.id, actor="t")
    assert [e.kind for e in store.events(limit=3)] == ["protected.removed", "protected.added", "protected.added"]


def test_events_are_append_only(store, edit_factory):
    store.add_edits([edit_factory()], actor="t")
    for sql in ("UPDATE events SET actor = 'x'", "DELETE FROM events"):
        with pytest.raises(DBAPIError, match="append-only"):
            with store.session() as s:
                s.execute(text(sql))
    assert store.events()[0].actor == "t"


def test_fresh_database_is_upgraded_on_first_use(empty_db_url):
    from migrations import head_revision

    with Store(empty_db_url, auto_upgrade=False) as s:
        assert s.current_revision() is None
    with Store(empty_db_url) as s:
        assert s.current_revision() == head_revision()
        assert s.status_counts()["pending"] == 0


def test_sqlite_connection_settings(tmp_path):
    with Store(f"sqlite:///{tmp_path / 'l.db'}") as s:
        with s.engine.connect() as c:
            assert c.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert c.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
            assert c.exec_driver_sql("PRAGMA busy_timeout").scalar() >= 1000


@pytest.mark.parametrize("url", ["sqlite:////nonexistent-dir/sub/ledger.db", "nosuchdialect://x/y",
                                 "postgresql+psycopg://nobody@127.0.0.1:1/none", "not a url"])
def test_unopenable_url_is_a_clear_error(url):
    t0 = time.monotonic()
    with pytest.raises(DatabaseUnavailable, match="database"):
        Store(url)
    assert time.monotonic() - t0 < 15
