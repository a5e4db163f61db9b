"""The status machine of an edit, in one place: `EditStatus`, the table of allowed moves, `transition()`.

`transition()` is the only code that writes `edits.status` (claims and sweeps included). It runs
`UPDATE edits SET status = :dst WHERE id IN :ids AND status = :src`; when fewer rows change than were
asked for, it raises `IllegalTransition` naming the ids and their current status, and the caller's
transaction rolls back. Every moved edit gets one event (kind `edit.<dst>`) in the same transaction.

    proposed ──► pending | rejected | cancelled      (review: `horse-ledger review approve|reject`)
    pending ──► claimed ──► applied ──► rolled_back ──► pending (requeue)
       │           │  └──► failed ──► pending (retry)        applied ──► superseded ──► applied
       │           ├──► rejected
       │           └──► pending (stale claim / abandoned batch)
       └──► cancelled | superseded

An applied edit is superseded when a later night publishes a new edit of the same subject and prompt; it
becomes applied again when that newer edit is rolled back while its own snapshot stays on the chain.
With review on (ledger/review.py), `add` creates `proposed` edits; only `pending` ones are ever claimed.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from enum import StrEnum
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from ledger.errors import IllegalTransition
from ledger.events import event_row
from ledger.models import Edit, Event, utcnow


class EditStatus(StrEnum):
    PENDING = "pending"
    CLAIMED = "claimed"
    APPLIED = "applied"
    FAILED = "failed"
    REJECTED = "rejected"
    CANCELLED = "cancelled"
    SUPERSEDED = "superseded"
    ROLLED_BACK = "rolled_back"
    PROPOSED = "proposed"  # awaiting review (ledger/review.py)


S = EditStatus


class SnapshotStatus(StrEnum):
    """A snapshot is published when written (`ledger.chain`) and can only ever be rolled back
    (`ledger.rollback.move_snapshots`, the one place it changes)."""

    PUBLISHED = "published"
    ROLLED_BACK = "rolled_back"


SNAPSHOT_MOVES = frozenset({(SnapshotStatus.PUBLISHED, SnapshotStatus.ROLLED_BACK)})
ALLOWED: dict[EditStatus, frozenset[EditStatus]] = {
    S.PROPOSED: frozenset({S.PENDING, S.REJECTED, S.CANCELLED}),  # review: approve, reject, withdraw
    S.PENDING: frozenset({S.CLAIMED, S.CANCELLED, S.SUPERSEDED}),
    S.CLAIMED: frozenset({S.APPLIED, S.FAILED, S.REJECTED, S.PENDING}),
    S.APPLIED: frozenset({S.ROLLED_BACK, S.SUPERSEDED}),
    S.FAILED: frozenset({S.PENDING}),
    S.ROLLED_BACK: frozenset({S.PENDING}),
    S.REJECTED: frozenset(),
    S.CANCELLED: frozenset(),
    S.SUPERSEDED: frozenset({S.APPLIED}),  # only by rollback, for an edit whose snapshot is still on the chain
}
# A second submission of the same fact while one of these holds it returns the existing edit.
ACTIVE: frozenset[EditStatus] = frozenset({S.PROPOSED, S.PENDING, S.CLAIMED, S.APPLIED})

# Columns transition() owns or that a move must not smuggle in through `values`.
_RESERVED = frozenset({"status", "id", "updated_at"})
_CHUNK = 500  # ids per UPDATE: well under SQLite's bound-parameter limit

# What to do next, by the status an edit is stuck in (for the IllegalTransition message).
_HINTS = {
    S.PROPOSED: "it awaits review: `horse-ledger review approve ID` (by someone other than its submitter)",
    S.APPLIED: "run `horse-ledger rollback <snapshot>` first",
    S.CLAIMED: "wait for the running batch to finish, or for the stale-claim sweep",
    S.FAILED: "it is retried automatically until max_attempts",
    S.CANCELLED: "submit it again with `horse-ledger add`",
    S.SUPERSEDED: "a newer edit replaced it; see `horse-ledger show` for the link",
    S.REJECTED: "submit a corrected edit with `horse-ledger add`",
}


def is_allowed(src: EditStatus | str, dst: EditStatus | str) -> bool:
    """Whether an edit may move from src to dst."""
    return EditStatus(dst) in ALLOWED[EditStatus(src)]


def transition(session: Session, ids: Iterable[int], src: EditStatus | str, dst: EditStatus | str, *,
               actor: str, reason: str | None = None, payload: Mapping[str, Any] | None = None,
               batch_id: int | None = None, snapshot_id: int | None = None,
               values: Mapping[str, Any] | None = None,
               payload_by_id: Mapping[int, Mapping[str, Any]] | None = None) -> None:
    """Move every edit in `ids` from `src` to `dst` and write one event per edit, in the caller's transaction.

    Args:
        session: an open session; the caller commits (or rolls back on the exception).
        ids: edit ids; duplicates are ignored, an empty list does nothing.
        src, dst: the move; it must be in ALLOWED.
        actor: who moves them ("cli:alice", "daemon"), recorded on the events.
        reason, payload: recorded on every event; payload_by_id adds per-edit payload keys.
        batch_id, snapshot_id: recorded on the events and, when given, written to the edits too.
        values: other edit columns to set in the same UPDATE (e.g. claim_token, last_error,
            attempts=Edit.attempts + 1); never `status`.
    Raises:
        IllegalTransition: the move is not in the table, or some edit is not in `src` (nothing is moved).
    """
    src, dst = EditStatus(src), EditStatus(dst)
    wanted = sorted(set(int(i) for i in ids))
    if not wanted:
        return
    if dst not in ALLOWED[src]:
        allowed = ", ".join(sorted(ALLOWED[src])) or "nothing (final)"
        raise IllegalTransition(f"an edit cannot move from {src} to {dst}; from {src} it can move to {allowed}",
                                current={})
    extra = dict(values or {})
    bad = _RESERVED & extra.keys()
    assert not bad, f"transition(values=...) may not set {sorted(bad)}"
    if batch_id is not None:
        extra["batch_id"] = batch_id
    if snapshot_id is not None:
        extra["snapshot_id"] = snapshot_id
    now = utcnow()
    for start in range(0, len(wanted), _CHUNK):
        chunk = wanted[start:start + _CHUNK]
        stmt = (update(Edit).where(Edit.id.in_(chunk), Edit.status == src.value)
                .values(status=dst.value, updated_at=now, **extra)
                .execution_options(synchronize_session=False))
        moved = session.execute(stmt).rowcount
        if moved != len(chunk):
            _raise_illegal(session, chunk, src, dst)
    rows = []
    for edit_id in wanted:
        body = {"from": src.value, "to": dst.value, **(payload or {}), **((payload_by_id or {}).get(edit_id, {}))}
        rows.append(event_row(f"edit.{dst.value}", actor=actor, edit_id=edit_id, batch_id=batch_id,
                              snapshot_id=snapshot_id, reason=reason, payload=body, at=now))
    session.execute(Event.__table__.insert(), rows)  # Core executemany: no ORM bulk overhead


def _raise_illegal(session: Session, chunk: list[int], src: EditStatus, dst: EditStatus) -> None:
    found = dict(session.execute(select(Edit.id, Edit.status).where(Edit.id.in_(chunk))).all())
    current = {i: found.get(i, "missing") for i in chunk if found.get(i) != src.value}
    # rows we may already have moved in this statement show dst; they are rolled back with the transaction
    current = {i: s for i, s in current.items() if s != dst.value} or current
    parts = [f"edit {i} is {s}" if s != "missing" else f"edit {i} does not exist" for i, s in list(current.items())[:10]]
    more = f" (and {len(current) - 10} more)" if len(current) > 10 else ""
    hint = ""
    if len(set(current.values())) == 1:
        only = next(iter(current.values()))
        hint = _HINTS.get(EditStatus(only), "") if only != "missing" else "see `horse-ledger list`"
    if current and set(current.values()) == {dst.value}:
        ids = ", ".join(str(i) for i in list(current)[:10])
        raise IllegalTransition(f"edit {ids}{more} is already {dst}; nothing to do", current=current)
    msg = f"cannot move to {dst}: {', '.join(parts)}{more}, not {src}"
    raise IllegalTransition(f"{msg}; {hint}" if hint else msg, current=current)
