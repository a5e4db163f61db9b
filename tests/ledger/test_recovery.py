"""ledger/recovery.py: a crashed batch's claims go back to pending until max_attempts, then fail (both backends)."""
from __future__ import annotations

from ledger.recovery import recover_claims


def test_crashed_claims_are_retried_until_max_attempts_then_fail(store, edit_factory):
    (a,) = store.add_edits([edit_factory()], actor="t")
    for attempt in (1, 2):
        claimed = store.claim_batch(10, base_model="m")  # the process "crashes" here: nothing releases it
        assert [e.id for e in claimed.edits] == [a.id]
        out = recover_claims(store, "m", max_attempts=3, actor="recover")
        assert (out.requeued, out.failed, out.abandoned_batches) == ([a.id], [], [claimed.batch_id])
        edit = store.get_edit(a.id)
        assert (edit.status, edit.attempts) == ("pending", attempt)
    claimed = store.claim_batch(10, base_model="m")
    out = recover_claims(store, "m", max_attempts=3, actor="recover")
    assert (out.requeued, out.failed) == ([], [a.id])
    edit = store.get_edit(a.id)
    assert (edit.status, edit.attempts) == ("failed", 3)
    assert "max_attempts = 3" in edit.last_error and "raise max_attempts" in edit.last_error
    assert store.retry_failed(3, actor="t") == []  # attempts never pass max_attempts silently
    assert store.get_batch(claimed.batch_id).status == "abandoned"
    kinds = [ev.kind for ev in store.events(edit_id=a.id, limit=None, oldest_first=True)]
    assert kinds[-1] == "edit.failed"


def test_recovery_leaves_other_models_claims_alone(store, edit_factory):
    store.add_edits([edit_factory()], actor="t")
    claimed = store.claim_batch(10, base_model="other")
    out = recover_claims(store, "m", max_attempts=3, actor="recover")
    assert (out.requeued, out.failed, out.abandoned_batches) == ([], [], [])
    assert store.get_edit(claimed.edits[0].id).status == "claimed"
