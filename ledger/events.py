"""Writing the audit trail: `record_event` adds one row to the append-only `events` table.

Call it inside the transaction that makes the change it records, so the change and its event commit or
roll back together. Edit status moves record their own events (`ledger.status.transition`).
"""
from __future__ import annotations

import math
from datetime import datetime
from typing import Any, Mapping

from sqlalchemy.orm import Session

from ledger.models import Event, utcnow


def record_event(session: Session, kind: str, *, actor: str, edit_id: int | None = None,
                 batch_id: int | None = None, snapshot_id: int | None = None, reason: str | None = None,
                 payload: Mapping[str, Any] | None = None, at: datetime | None = None) -> None:
    """Append one audit event, e.g. kind="batch.claimed", "snapshot.published", "head.moved"."""
    session.execute(Event.__table__.insert(), [event_row(kind, actor=actor, edit_id=edit_id, batch_id=batch_id,
                                              snapshot_id=snapshot_id, reason=reason, payload=payload, at=at)])


def event_row(kind: str, *, actor: str, edit_id: int | None = None, batch_id: int | None = None,
              snapshot_id: int | None = None, reason: str | None = None,
              payload: Mapping[str, Any] | None = None, at: datetime | None = None) -> dict[str, Any]:
    """The column values of one event, for bulk inserts."""
    return {"at": at or utcnow(), "actor": actor, "kind": kind, "edit_id": edit_id, "batch_id": batch_id,
            "snapshot_id": snapshot_id, "reason": reason, "payload": json_safe(dict(payload or {}))}


def json_safe(value: Any) -> Any:
    """`value` with NaN and ±Inf floats as None (PostgreSQL's JSON has no NaN; SQLite's would store it)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value
