"""The Store: sessions on the ledger database and every query and write the CLI and the daemon make.

    store = Store("sqlite:///ledger.db")          # or postgresql+psycopg://user@host/db
    results = store.add_edits([spec], actor="cli:alice")
    batch = store.claim_batch(100, base_model="smollm2-135m")

Opening a Store connects once (a URL that cannot be opened raises `DatabaseUnavailable`) and upgrades the
schema to the Alembic head unless `auto_upgrade=False`. SQLite runs in WAL mode with foreign keys on, a busy
timeout, and `BEGIN IMMEDIATE` for every write transaction (so writers queue instead of failing);
PostgreSQL claims with `FOR UPDATE SKIP LOCKED`. Status changes go through `ledger.status.transition`
(edits) and `ledger.batch_status.move_batch` (batches).

The class is assembled from one module per role: `ledger.db` (engine, sessions, schema), `ledger.submit`
(add_edits, cancel), `ledger.claims` (the daemon's claims), this module (reads, protected facts, the head);
the records it returns are `ledger.records`'.
"""
from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from ledger.claims import Claims
from ledger.db import chunks, open_engine
from ledger.errors import BatchNotFound, LedgerError, ProtectedFactNotFound, SnapshotNotFound
from ledger.events import record_event
from ledger.models import Batch, Edit, Event, Head, ProtectedFact, Snapshot, SnapshotEdit, utcnow
from ledger.records import AddResult, BatchRecord, ClaimedBatch, EditRecord, EventRecord, ProtectedFactRecord
from ledger.status import EditStatus
from ledger.submit import Submitting
from ledger.validate import EditSpec

__all__ = ["Store", "EditSpec", "EditRecord", "AddResult", "ClaimedBatch", "EventRecord", "BatchRecord",
           "ProtectedFactRecord", "open_engine", "set_head", "snapshot_chain_in"]


class Store(Submitting, Claims):
    """The ledger database. Thread-safe to share; open one per process."""

    # ---- queries
    def get_edit(self, edit_id: int) -> EditRecord:
        with self.session(write=False) as s:
            return EditRecord.from_row(self._require_edit(s, edit_id))

    def get_edits(self, ids: Sequence[int]) -> list[EditRecord]:
        out: list[EditRecord] = []
        with self.session(write=False) as s:
            for chunk in chunks(list(ids)):
                rows = s.execute(select(Edit).where(Edit.id.in_(chunk)).order_by(Edit.id)).scalars()
                out.extend(EditRecord.from_row(r) for r in rows)
        return out

    def list_edits(self, *, status: str | Sequence[str] | None = None, subject: str | None = None,
                   since: datetime | None = None, batch_id: int | None = None, snapshot_id: int | None = None,
                   limit: int | None = 100, oldest_first: bool = False) -> list[EditRecord]:
        """Edits, newest first (or oldest first), filtered; `subject` matches a case-insensitive substring."""
        q = select(Edit)
        if status is not None:
            statuses = [status] if isinstance(status, str) else list(status)
            q = q.where(Edit.status.in_([EditStatus(x).value for x in statuses]))
        if subject:
            # lower() is ASCII-only on SQLite (and in a C-locale PostgreSQL): also match the text as given
            q = q.where(or_(Edit.subject.contains(subject, autoescape=True),
                            func.lower(Edit.subject).contains(subject.lower(), autoescape=True)))
        if since is not None:
            q = q.where(Edit.submitted_at >= since)
        if batch_id is not None:
            q = q.where(Edit.batch_id == batch_id)
        if snapshot_id is not None:
            q = q.where(Edit.id.in_(select(SnapshotEdit.edit_id).where(SnapshotEdit.snapshot_id == snapshot_id)))
        q = q.order_by(Edit.id.asc() if oldest_first else Edit.id.desc())
        if limit is not None:
            q = q.limit(limit)
        with self.session(write=False) as s:
            return [EditRecord.from_row(r) for r in s.execute(q).scalars()]

    def events(self, *, edit_id: int | None = None, batch_id: int | None = None, snapshot_id: int | None = None,
               kind_prefix: str | None = None, since: datetime | None = None, limit: int | None = 100,
               oldest_first: bool = False, actor: str | None = None) -> list[EventRecord]:
        """The audit trail, newest first (or oldest first), filtered; `actor` matches the identity itself
        and any prefixed form of it (cli:alice, apply:cli:alice for alice)."""
        q = select(Event)
        if actor:
            q = q.where(or_(Event.actor == actor, Event.actor.endswith(":" + actor, autoescape=True)))
        if edit_id is not None:
            q = q.where(Event.edit_id == edit_id)
        if batch_id is not None:
            q = q.where(Event.batch_id == batch_id)
        if snapshot_id is not None:
            q = q.where(Event.snapshot_id == snapshot_id)
        if kind_prefix:
            q = q.where(Event.kind.startswith(kind_prefix, autoescape=True))
        if since is not None:
            q = q.where(Event.at >= since)
        q = q.order_by(Event.id.asc() if oldest_first else Event.id.desc())
        if limit is not None:
            q = q.limit(limit)
        with self.session(write=False) as s:
            return [EventRecord.from_row(r) for r in s.execute(q).scalars()]

    def status_counts(self) -> dict[str, int]:
        """Number of edits per status, every status present (zero included)."""
        with self.session(write=False) as s:
            got = dict(s.execute(select(Edit.status, func.count()).group_by(Edit.status)).all())
        return {st.value: int(got.get(st.value, 0)) for st in EditStatus}

    def get_batch(self, batch_id: int) -> BatchRecord:
        with self.session(write=False) as s:
            row = s.get(Batch, batch_id)
            if row is None:
                raise BatchNotFound(f"no batch has id {batch_id}; see `horse-ledger log` for recent batches")
            return BatchRecord.from_row(row)

    def last_batch(self) -> BatchRecord | None:
        with self.session(write=False) as s:
            row = s.execute(select(Batch).order_by(Batch.id.desc()).limit(1)).scalar_one_or_none()
            return BatchRecord.from_row(row) if row else None

    def head(self, base_model: str) -> Snapshot | None:
        """The snapshot served for base_model (a detached ORM row), or None for the unedited base."""
        with self.session(write=False) as s:
            head = s.get(Head, base_model)
            return s.get(Snapshot, head.snapshot_id) if head and head.snapshot_id is not None else None

    def heads(self) -> dict[str, int | None]:
        """base_model → current snapshot id (None = base), for every model with a head row."""
        with self.session(write=False) as s:
            return dict(s.execute(select(Head.base_model, Head.snapshot_id).order_by(Head.base_model)).all())

    def get_snapshot(self, snapshot_id: int) -> Snapshot:
        with self.session(write=False) as s:
            row = s.get(Snapshot, snapshot_id)
            if row is None:
                raise SnapshotNotFound(f"no snapshot has id {snapshot_id}; see `horse-ledger snapshots`")
            return row

    def list_snapshots(self, base_model: str | None = None) -> list[Snapshot]:
        q = select(Snapshot).order_by(Snapshot.id)
        if base_model is not None:
            q = q.where(Snapshot.base_model == base_model)
        with self.session(write=False) as s:
            return list(s.execute(q).scalars())

    def snapshot_chain(self, snapshot_id: int) -> list[Snapshot]:
        """The snapshot and its ancestors, root first (a consolidated snapshot has no parent)."""
        with self.session(write=False) as s:
            return snapshot_chain_in(s, snapshot_id)

    def snapshot_edit_ids(self, snapshot_id: int) -> list[int]:
        with self.session(write=False) as s:
            return list(s.execute(select(SnapshotEdit.edit_id).where(SnapshotEdit.snapshot_id == snapshot_id)
                                  .order_by(SnapshotEdit.edit_id)).scalars())

    # ---- protected facts
    def add_protected(self, *, prompt: str, target: str, subject: str | None = None, note: str | None = None,
                      actor: str) -> ProtectedFactRecord:
        """Add a fact the gate must keep true. Raises InvalidEdit on bad text (same rules as edits)."""
        from ledger.validate import validate_protected

        checked = validate_protected(prompt=prompt, target=target, subject=subject, note=note)
        subject, prompt, target, note = checked["subject"], checked["prompt"], checked["target"], checked["note"]
        with self.session() as s:
            row = ProtectedFact(subject=subject, prompt=prompt, target=target, note=note, author=actor,
                                created_at=utcnow())
            s.add(row)
            s.flush()
            record_event(s, "protected.added", actor=actor, payload={"protected_id": row.id, "prompt": prompt,
                                                                     "target": target})
            return ProtectedFactRecord.from_row(row)

    def list_protected(self) -> list[ProtectedFactRecord]:
        with self.session(write=False) as s:
            return [ProtectedFactRecord.from_row(r)
                    for r in s.execute(select(ProtectedFact).order_by(ProtectedFact.id)).scalars()]

    def remove_protected(self, protected_id: int, *, actor: str) -> ProtectedFactRecord:
        with self.session() as s:
            row = s.get(ProtectedFact, protected_id)
            if row is None:
                raise ProtectedFactNotFound(f"no protected fact has id {protected_id}; see `horse-ledger protect list`")
            record = ProtectedFactRecord.from_row(row)
            s.delete(row)
            record_event(s, "protected.removed", actor=actor,
                         payload={"protected_id": protected_id, "prompt": row.prompt, "target": row.target})
            return record


def set_head(session: Session, base_model: str, snapshot_id: int | None, *, actor: str,
             reason: str | None = None) -> int | None:
    """Point base_model's head at snapshot_id (None = base) in the caller's transaction, with a
    `head.moved` event; returns the previous snapshot id."""
    head = session.get(Head, base_model)
    previous = head.snapshot_id if head else None
    if head is None:
        session.add(Head(base_model=base_model, snapshot_id=snapshot_id, updated_at=utcnow()))
    else:
        head.snapshot_id, head.updated_at = snapshot_id, utcnow()
    session.flush()
    record_event(session, "head.moved", actor=actor, snapshot_id=snapshot_id, reason=reason,
                 payload={"base_model": base_model, "from": previous, "to": snapshot_id})
    return previous



def snapshot_chain_in(session: Session, snapshot_id: int | None) -> list[Snapshot]:
    """The snapshots from the root of the chain to `snapshot_id`, root first ([] for the unedited base).

    Raises:
        SnapshotNotFound: an id on the chain has no row.
        LedgerError: the parent links loop (the ledger is damaged).
    """
    out: list[Snapshot] = []
    seen: set[int] = set()
    current = snapshot_id
    while current is not None:
        if current in seen:
            raise LedgerError(f"snapshot {current} is its own ancestor; the ledger is damaged: restore the "
                              "database from a backup")
        seen.add(current)
        row = session.get(Snapshot, current)
        if row is None:
            raise SnapshotNotFound(f"snapshot {current} does not exist; see `horse-ledger snapshots`")
        out.append(row)
        current = row.parent_id
    return out[::-1]
