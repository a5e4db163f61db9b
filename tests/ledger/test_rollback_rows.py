"""`ledger.rollback`: the rows a rollback changes, on a real database (SQLite file and PostgreSQL): later snapshots
become rolled_back through the one snapshot transition (published → rolled_back, with an event), their edits
rolled_back or requeued, the head moves; anything else is refused and writes nothing."""
from __future__ import annotations

import pytest
from sqlalchemy import func, select

from ledger.errors import IllegalTransition, NotOnChain, SnapshotNotFound
from ledger.models import Event, Snapshot, SnapshotEdit, utcnow
from ledger.rollback import move_snapshots, roll_back
from ledger.status import EditStatus, SnapshotStatus, transition
from ledger.store import Store, set_head

MODEL = "tiny-llama"


def chain_of_two(store: Store, edit_factory) -> tuple[list[int], list[int]]:
    """Two published snapshots (2 on 1), one applied edit each, the head on 2: (snapshot ids, edit ids)."""
    edits = store.add_edits([edit_factory(), edit_factory()], actor="test")
    ids = [e.id for e in edits]
    with store.session() as s:
        transition(s, ids, EditStatus.PENDING, EditStatus.CLAIMED, actor="test")
        transition(s, ids, EditStatus.CLAIMED, EditStatus.APPLIED, actor="test")
        snaps, parent = [], None
        for edit_id in ids:
            snap = Snapshot(parent_id=parent, base_model=MODEL, path=f"{MODEL}/{edit_id}.safetensors",
                            sha256="0" * 64, bytes=1, created_at=utcnow(), status="published", metrics={})
            s.add(snap)
            s.flush()
            s.add(SnapshotEdit(snapshot_id=snap.id, edit_id=edit_id))
            snaps.append(snap.id)
            parent = snap.id
        set_head(s, MODEL, parent, actor="test")
    return snaps, ids


def test_rollback_moves_rows_and_records_each_snapshot(db_url, edit_factory):
    store = Store(db_url)
    (first, second), (e1, e2) = chain_of_two(store, edit_factory)
    with store.session() as s:
        result = roll_back(s, MODEL, first, requeue=True, actor="test")
    assert (result.from_snapshot, result.to_snapshot, result.rolled_back_snapshots) == (second, first, [second])
    assert result.rolled_back_edits == result.requeued_edits == [e2]
    with store.session(write=False) as s:
        assert s.get(Snapshot, second).status == SnapshotStatus.ROLLED_BACK
        assert s.get(Snapshot, first).status == SnapshotStatus.PUBLISHED
        assert s.scalar(select(func.count()).select_from(Event).where(Event.kind == "snapshot.rolled_back")) == 1
    assert store.get_edit(e2).status == EditStatus.PENDING and store.get_edit(e1).status == EditStatus.APPLIED


@pytest.mark.parametrize("target, error", [(99, SnapshotNotFound), ("second", NotOnChain)])
def test_refused_targets_write_nothing(db_url, edit_factory, target, error):
    store = Store(db_url)
    (first, second), _ = chain_of_two(store, edit_factory)
    with store.session() as s:
        roll_back(s, MODEL, first, requeue=False, actor="test")  # `second` is now rolled back
    with store.session(write=False) as s:
        n_events = s.scalar(select(func.count()).select_from(Event))
    with pytest.raises(error), store.session() as s:
        roll_back(s, MODEL, second if target == "second" else target, requeue=False, actor="test")
    with store.session(write=False) as s:
        assert s.scalar(select(func.count()).select_from(Event)) == n_events


def test_a_rolled_back_snapshot_cannot_move_again(db_url, edit_factory):
    store = Store(db_url)
    (first, second), _ = chain_of_two(store, edit_factory)
    with store.session() as s:
        roll_back(s, MODEL, None, requeue=False, actor="test")
    with pytest.raises(IllegalTransition, match="rolled_back"), store.session() as s:
        move_snapshots(s, [s.get(Snapshot, second)], SnapshotStatus.ROLLED_BACK, actor="test", reason="again")
