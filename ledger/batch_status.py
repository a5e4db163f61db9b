"""A batch's status: the enum, the one table of allowed moves, and `move_batch`, the only writer of `batches.status`
after the row is created (by `Store.claim_batch`, as claimed). The batch counterpart of `ledger.status`.

    claimed ──► running | abandoned | failed
    running ──► published | failed | rejected | abandoned

`ledger.chain` re-exports these (the night's rows), `Store.release_batch`, `Store.sweep_stale` and
`Store.update_batch` and `ledger.recovery` move batches through `move_batch`.
"""
from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from typing import Any

from sqlalchemy import update
from sqlalchemy.orm import Session

from ledger.errors import LedgerError
from ledger.events import json_safe, record_event
from ledger.models import Batch, utcnow


class BatchStatus(StrEnum):
    CLAIMED = "claimed"
    RUNNING = "running"
    PUBLISHED = "published"
    FAILED = "failed"          # nothing published: every edit failed, or the batch raised
    REJECTED = "rejected"      # nothing published: the gate rejected what took
    ABANDONED = "abandoned"    # stopped (SIGTERM) or crashed; its edits went back to pending


BATCH_MOVES: dict[BatchStatus, frozenset[BatchStatus]] = {
    BatchStatus.CLAIMED: frozenset({BatchStatus.RUNNING, BatchStatus.ABANDONED, BatchStatus.FAILED}),
    BatchStatus.RUNNING: frozenset({BatchStatus.PUBLISHED, BatchStatus.FAILED, BatchStatus.REJECTED,
                                    BatchStatus.ABANDONED}),
}
OPEN = (BatchStatus.CLAIMED, BatchStatus.RUNNING)  # a batch that has not finished


class IllegalBatchMove(LedgerError):
    """A batch status change outside BATCH_MOVES (a bug in the caller, or a batch another process finished)."""


def move_batch(session: Session, batch_id: int, dst: BatchStatus, *, actor: str, reason: str | None = None,
               metrics: Mapping[str, Any] | None = None, payload: Mapping[str, Any] | None = None,
               snapshot_id: int | None = None) -> None:
    """Move batch `batch_id` to `dst` (with its `batch.<dst>` event, carrying `reason`, `payload` and
    `snapshot_id`): `UPDATE … WHERE status = <its status>`, so a move BATCH_MOVES does not allow, or a batch
    another transaction moved meanwhile, raises IllegalBatchMove. A finished batch gets `finished_at`; `reason`
    becomes its `error`, `metrics` (JSON-safe) its metrics."""
    batch = session.get(Batch, batch_id)
    if batch is None:
        raise IllegalBatchMove(f"batch {batch_id} does not exist")
    src = BatchStatus(batch.status)
    if dst not in BATCH_MOVES.get(src, frozenset()):
        raise IllegalBatchMove(f"batch {batch_id} is {src.value}; it cannot become {dst.value}")
    values: dict[str, Any] = {"status": dst.value}
    if dst not in (BatchStatus.RUNNING,):
        values["finished_at"] = utcnow()
    if reason is not None:
        values["error"] = reason[:1900]
    if metrics is not None:
        values["metrics"] = json_safe(dict(metrics))
    moved = session.execute(update(Batch).where(Batch.id == batch_id, Batch.status == src.value).values(**values)
                            .execution_options(synchronize_session="fetch"))  # the loaded row only if it moved
    if moved.rowcount != 1:
        raise IllegalBatchMove(f"batch {batch_id} is no longer {src.value} (another process moved it); it was not "
                               f"made {dst.value}")
    record_event(session, f"batch.{dst.value}", actor=actor, batch_id=batch_id, reason=reason,
                 snapshot_id=snapshot_id, payload=None if payload is None else dict(payload))
