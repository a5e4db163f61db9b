"""Crash recovery of claims: what happens to the edits of a batch whose process died (SIGKILL, OOM, power).

    recovered = recover_claims(store, "smollm2-135m", max_attempts=3, actor="daemon")
    recovered.requeued   # claimed → pending: tried fewer than max_attempts times, retried by the next batch
    recovered.failed     # claimed → failed: their batch crashed and they have used up max_attempts

Decision (issue 27): a claim that ended in a crash counts as an attempt (`claim_batch` already added it), so
an edit that kills the process every time it is edited is not retried forever: once `attempts` reaches
`max_attempts` it becomes failed, with a `last_error` that says so and what to do, and an event. `attempts` is
never pushed past `max_attempts` by recovery without that failure being recorded. Raising max_attempts in
the config lets `retry_failed` pick the edit up again.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy import select

from ledger.chain import BatchStatus, move_batch
from ledger.models import Batch, Edit
from ledger.status import EditStatus, transition

CRASH_REASON = "recovered: the batch that claimed them ended without finishing (crash)"


@dataclass(frozen=True)
class Recovered:
    """What recover_claims did: edit ids back to pending, edit ids failed, batch ids marked abandoned."""

    requeued: list[int] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)
    abandoned_batches: list[int] = field(default_factory=list)


def recover_claims(store, base_model: str, max_attempts: int, *, actor: str) -> Recovered:
    """In one transaction: every edit still claimed by a batch of `base_model` goes back to pending, or to
    failed when it has been tried `max_attempts` times; every batch of the model still claimed/running is
    marked abandoned. Call under the applier lock, before claiming (daemon/cycle.py `_recover`).

    Args:
        store: a ledger.store.Store.
        max_attempts: settings.max_attempts.
    Returns:
        Recovered(requeued, failed, abandoned_batches), ids sorted.
    """
    with store.session() as s:
        rows = s.execute(select(Edit.id, Edit.attempts).join(Batch, Batch.id == Edit.batch_id)
                         .where(Edit.status == EditStatus.CLAIMED.value, Batch.base_model == base_model)).all()
        spent = sorted(i for i, attempts in rows if attempts >= max_attempts)
        requeued = sorted(i for i, attempts in rows if attempts < max_attempts)
        transition(s, requeued, EditStatus.CLAIMED, EditStatus.PENDING, actor=actor, reason=CRASH_REASON,
                   values={"claim_token": None})
        error = (f"its batch crashed and it has been tried max_attempts = {max_attempts} times (the edit may crash "
                 "the editor); check it with `horse-ledger show`, then raise max_attempts or resubmit it")
        transition(s, spent, EditStatus.CLAIMED, EditStatus.FAILED, actor=actor,
                   reason=f"{CRASH_REASON}; max_attempts reached", values={"claim_token": None, "last_error": error})
        stuck = sorted(s.execute(select(Batch.id).where(
            Batch.base_model == base_model,
            Batch.status.in_((BatchStatus.CLAIMED.value, BatchStatus.RUNNING.value)))).scalars())
        for batch_id in stuck:
            move_batch(s, batch_id, BatchStatus.ABANDONED, actor=actor,
                       reason="the process running it ended without finishing (crash); its edits went back to "
                              "pending (or failed, at max_attempts)")
        return Recovered(requeued=requeued, failed=spent, abandoned_batches=stuck)
