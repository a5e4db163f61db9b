"""ledger/batch_status.py: a batch's status moves only along BATCH_MOVES, through `move_batch`, also when the Store
moves it (update_batch, release_batch, sweep_stale)."""
from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import update

from ledger.batch_status import BATCH_MOVES, BatchStatus, IllegalBatchMove, move_batch
from ledger.models import Batch, Edit, utcnow


def test_every_move_in_the_table_is_between_statuses_and_finished_batches_stay():
    assert all(src not in dsts for src, dsts in BATCH_MOVES.items())
    for done in (BatchStatus.PUBLISHED, BatchStatus.FAILED, BatchStatus.REJECTED, BatchStatus.ABANDONED):
        assert done not in BATCH_MOVES


def test_store_moves_batches_through_the_table(store, edit_factory):
    store.add_edits([edit_factory() for _ in range(2)], actor="t")
    b = store.claim_batch(1, base_model="m")
    assert store.get_batch(b.batch_id).status == "claimed"
    store.update_batch(b.batch_id, actor="daemon", status="running")
    assert store.get_batch(b.batch_id).status == "running" and store.get_batch(b.batch_id).finished_at is None
    assert [e.kind for e in store.events(batch_id=b.batch_id, oldest_first=True)][-1] == "batch.running"
    released = store.release_batch(b.token, actor="daemon", reason="stopping")
    batch = store.get_batch(b.batch_id)
    assert (batch.status, batch.error, batch.finished_at is not None) == ("abandoned", "stopping", True)
    (last,) = store.events(batch_id=b.batch_id, limit=1)
    assert (last.kind, last.payload) == ("batch.abandoned", {"released": released})
    with pytest.raises(IllegalBatchMove, match="abandoned; it cannot become running"):
        store.update_batch(b.batch_id, actor="daemon", status="running")
    with pytest.raises(IllegalBatchMove):
        store.release_batch(b.token, actor="daemon", reason="again")
    assert store.get_batch(b.batch_id).status == "abandoned"


def test_sweep_abandons_only_open_batches(store, edit_factory):
    store.add_edits([edit_factory()], actor="t")
    b = store.claim_batch(1, base_model="m")
    with store.session() as s:  # a finished batch whose edit is (wrongly) still claimed and stale
        s.execute(update(Batch).where(Batch.id == b.batch_id).values(status="failed"))
        s.execute(update(Edit).where(Edit.claim_token == b.token).values(heartbeat_at=utcnow() - timedelta(hours=2)))
    assert store.sweep_stale(60, actor="daemon") == [b.edits[0].id]
    assert store.get_batch(b.batch_id).status == "failed"
    assert not store.events(batch_id=b.batch_id, kind_prefix="batch.abandoned")


def test_a_move_from_a_status_another_transaction_changed_is_refused(store, edit_factory):
    store.add_edits([edit_factory()], actor="t")
    b = store.claim_batch(1, base_model="m")
    with store.session() as s:
        loaded = s.get(Batch, b.batch_id)  # held in the session as claimed
        s.execute(update(Batch).where(Batch.id == b.batch_id).values(status="running")
                  .execution_options(synchronize_session=False))
        with pytest.raises(IllegalBatchMove, match="no longer claimed"):
            move_batch(s, b.batch_id, BatchStatus.FAILED, actor="t")
        assert loaded.status == "claimed"
