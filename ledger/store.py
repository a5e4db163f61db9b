"""The Store: sessions on the ledger database and every query and write the CLI and the daemon make.

    store = Store("sqlite:///ledger.db")          # or postgresql+psycopg://user@host/db
    results = store.add_edits([spec], actor="cli:alice")
    batch = store.claim_batch(100, base_model="smollm2-135m")

Opening a Store connects once (a URL that cannot be opened raises `DatabaseUnavailable`) and upgrades the
schema to the Alembic head unless `auto_upgrade=False`. SQLite runs in WAL mode with foreign keys on, a busy
timeout, and `BEGIN IMMEDIATE` for every write transaction (so writers queue instead of failing);
PostgreSQL claims with `FOR UPDATE SKIP LOCKED`. Status changes go through `ledger.status.transition`.
"""
from __future__ import annotations

import secrets
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields
from datetime import datetime, timedelta
from typing import Any, Callable

from sqlalchemy import Engine, create_engine, event, func, insert, or_, select, text, update
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from ledger.errors import (BatchNotFound, DatabaseUnavailable, EditNotFound, LedgerError, ProtectedFactNotFound,
                           SnapshotNotFound)
from ledger.events import event_row, record_event
from ledger.models import (Batch, Edit, Event, Head, ProtectedFact, Snapshot, SnapshotEdit, as_utc,
                           render_prompt, utcnow)
from ledger.review import (Intake, check_daily_quota, intake_decider, night_cap_clause, record_policy_approvals,
                           session_identity)
from ledger.status import ACTIVE, EditStatus, transition
from ledger.validate import EditSpec, check_text

__all__ = ["Store", "EditSpec", "EditRecord", "AddResult", "ClaimedBatch", "EventRecord", "BatchRecord",
           "ProtectedFactRecord", "open_engine"]

SQLITE_BUSY_TIMEOUT_MS = 30_000
_IN_CHUNK = 500
_PG_ADD_LOCK = 0x6C656467  # pg_advisory_xact_lock key that serialises add_edits (idempotency, supersede)
_PG_MIGRATE_LOCK = 0x6D696772


# ------------------------------------------------------------------------------------------- records

@dataclass(frozen=True)
class EditRecord:
    """A read-only copy of one edit row."""

    id: int
    subject: str
    prompt: str
    target_new: str
    target_true: str | None
    paraphrases: list[str]
    status: str
    attempts: int
    batch_id: int | None
    snapshot_id: int | None
    source: str | None
    author: str | None
    note: str | None
    submitted_at: datetime
    updated_at: datetime
    content_hash: str
    claim_token: str | None
    claimed_at: datetime | None
    heartbeat_at: datetime | None
    last_error: str | None
    supersedes_id: int | None
    superseded_by_id: int | None
    aliases: tuple[str, ...] = ()  # other names of the subject; not part of the fact's hashes
    # review (ledger/review.py): the submitting identity, the decision, who made it (identity or policy:<name>)
    submitted_by: str | None = None
    review: str | None = None
    reviewed_by: str | None = None
    reviewed_at: datetime | None = None

    @property
    def rendered_prompt(self) -> str:
        """The prompt with `{}` replaced by the subject (or the prompt itself when it contains the subject)."""
        return render_prompt(self.prompt, self.subject)

    @property
    def names(self) -> tuple[str, ...]:
        """Every name of the subject: (subject, *aliases), the subject first."""
        return (self.subject, *self.aliases)

    @classmethod
    def from_row(cls, row: Any) -> EditRecord:
        """From an Edit ORM object or a Core row of the edits table."""
        get = row._mapping.__getitem__ if hasattr(row, "_mapping") else row.__getattribute__
        values = {name: get(name) for name in _EDIT_FIELDS}
        for name in ("submitted_at", "updated_at", "claimed_at", "heartbeat_at", "reviewed_at"):
            values[name] = as_utc(values[name])
        values["paraphrases"] = list(values["paraphrases"] or [])
        values["aliases"] = tuple(values["aliases"] or ())
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: _jsonable(getattr(self, f.name)) for f in fields(self)}
        out["aliases"] = list(self.aliases)
        out["n_aliases"] = len(self.aliases)
        out["rendered_prompt"] = self.rendered_prompt
        return out


_EDIT_FIELDS = tuple(f.name for f in fields(EditRecord))


@dataclass(frozen=True)
class AddResult:
    """What add_edits did with one spec: its edit id, whether it is new, and the edit it superseded."""

    id: int
    created: bool
    superseded_id: int | None = None
    status: str = EditStatus.PENDING.value


@dataclass(frozen=True)
class ClaimedBatch:
    batch_id: int
    token: str
    edits: list[EditRecord]


@dataclass(frozen=True)
class EventRecord:
    id: int
    at: datetime
    actor: str
    kind: str
    edit_id: int | None
    batch_id: int | None
    snapshot_id: int | None
    reason: str | None
    payload: dict[str, Any]

    @classmethod
    def from_row(cls, row: Event) -> EventRecord:
        values = {f.name: getattr(row, f.name) for f in fields(cls)}
        values["at"] = as_utc(values["at"])
        values["payload"] = dict(values["payload"] or {})
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _jsonable(getattr(self, f.name)) for f in fields(self)}


@dataclass(frozen=True)
class BatchRecord:
    id: int
    token: str
    base_model: str
    status: str
    actor: str
    n_edits: int
    started_at: datetime
    finished_at: datetime | None
    metrics: dict[str, Any]
    error: str | None

    @classmethod
    def from_row(cls, row: Batch) -> BatchRecord:
        values = {f.name: getattr(row, f.name) for f in fields(cls)}
        values["started_at"] = as_utc(values["started_at"])
        values["finished_at"] = as_utc(values["finished_at"])
        values["metrics"] = dict(values["metrics"] or {})
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _jsonable(getattr(self, f.name)) for f in fields(self)}


@dataclass(frozen=True)
class ProtectedFactRecord:
    id: int
    subject: str | None
    prompt: str
    target: str
    note: str | None
    author: str | None
    created_at: datetime

    @property
    def rendered_prompt(self) -> str:
        return render_prompt(self.prompt, self.subject or "")

    @classmethod
    def from_row(cls, row: ProtectedFact) -> ProtectedFactRecord:
        values = {f.name: getattr(row, f.name) for f in fields(cls)}
        values["created_at"] = as_utc(values["created_at"])
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: _jsonable(getattr(self, f.name)) for f in fields(self)}
        out["rendered_prompt"] = self.rendered_prompt
        return out


def _created_payload(spec: EditSpec, decision: dict[str, Any]) -> dict[str, Any] | None:
    """The `edit.created` event's payload: the source, and the status the edit starts in when review is on."""
    out = {"source": spec.source} if spec.source else {}
    if decision["status"] != EditStatus.PENDING.value or decision["review"]:
        out.update(status=decision["status"], review=decision["review"], reviewed_by=decision["reviewed_by"])
    return out or None


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        return as_utc(value).isoformat().replace("+00:00", "Z")
    return value


# -------------------------------------------------------------------------------------------- engine

def open_engine(url: str, *, echo: bool = False) -> Engine:
    """An Engine with the ledger's connection settings (SQLite: WAL, foreign keys, busy timeout, explicit
    BEGIN so write transactions can be `BEGIN IMMEDIATE`).

    Raises:
        DatabaseUnavailable: the URL is malformed or names a driver that is not installed.
    """
    try:
        parsed = make_url(url)
        if parsed.get_backend_name() == "sqlite":
            engine = create_engine(parsed, echo=echo,
                                   connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000})
            _configure_sqlite(engine)
        else:
            connect_args = {"connect_timeout": 10} if parsed.get_backend_name() == "postgresql" else {}
            engine = create_engine(parsed, echo=echo, pool_pre_ping=True, connect_args=connect_args)
    except (ArgumentError, NoSuchModuleError, ImportError, ValueError) as exc:
        raise DatabaseUnavailable(f"the database URL {_safe(url)!r} cannot be used ({exc}); "
                                  "give a SQLAlchemy URL such as sqlite:///path/ledger.db or "
                                  "postgresql+psycopg://user@host/dbname") from None
    return engine


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # we emit BEGIN ourselves (see _on_begin)
        cur = dbapi_conn.cursor()
        cur.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
        cur.execute("PRAGMA foreign_keys = ON")
        if cur.execute("PRAGMA journal_mode").fetchone()[0].lower() not in ("wal", "memory"):
            cur.execute("PRAGMA journal_mode = WAL")
        cur.execute("PRAGMA synchronous = NORMAL")  # safe with WAL: a crash loses at most the last commit
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql(conn.get_execution_options().get("sqlite_begin", "BEGIN"))


def _safe(url: str) -> str:
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - only for the message
        return url


# --------------------------------------------------------------------------------------------- store

class Store:
    """The ledger database. Thread-safe to share; open one per process."""

    def __init__(self, url: str, *, auto_upgrade: bool = True, echo: bool = False,
                 night_cap_per_identity: int = 0) -> None:
        self.url = url
        # claim_batch claims at most this many edits of one submitter (0 = no cap): Settings.review_max_edits_per_night
        self.night_cap_per_identity = night_cap_per_identity
        self.engine = open_engine(url, echo=echo)
        self.dialect = self.engine.dialect.name
        # SQLite writers take the write lock up front (BEGIN IMMEDIATE): no deadlock on lock upgrade.
        self._write_engine = (self.engine.execution_options(sqlite_begin="BEGIN IMMEDIATE")
                              if self.dialect == "sqlite" else self.engine)
        self._read = sessionmaker(self.engine, expire_on_commit=False)
        self._write = sessionmaker(self._write_engine, expire_on_commit=False)
        try:
            with self.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        except (DBAPIError, SQLAlchemyError) as exc:
            self.engine.dispose()
            reason = str(getattr(exc, "orig", exc)).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise DatabaseUnavailable(f"cannot open the database {_safe(url)}: {reason}; check the --db URL "
                                      "(HORSE_LEDGER_DB), that the directory exists and the server is running") from exc
        if auto_upgrade:
            self.upgrade()

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- schema
    def upgrade(self, revision: str = "head") -> str | None:
        """Upgrade the schema to `revision` (under a lock, so racing processes migrate once); returns it."""
        from migrations import current_revision, head_revision, upgrade

        if revision == "head":  # the common case: already at head, no lock, no Alembic environment
            with self.engine.connect() as conn:
                if _has_version_table(conn) and current_revision(conn) == head_revision():
                    return head_revision()
        with self._write_engine.begin() as conn:
            if self.dialect == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_MIGRATE_LOCK})
            upgrade(conn, revision)
            return current_revision(conn)

    def current_revision(self) -> str | None:
        from migrations import current_revision

        with self.engine.connect() as conn:
            return current_revision(conn)

    # ---- sessions
    @contextmanager
    def session(self, *, write: bool = True) -> Iterator[Session]:
        """A session in one transaction: commits on success, rolls back on error.

        write=True (the default) takes SQLite's write lock at BEGIN; keep such transactions short.
        """
        maker = self._write if write else self._read
        with maker() as session:
            with session.begin():
                yield session

    # ---- submitting
    def add_edits(self, specs: Sequence[EditSpec], *, actor: str,
                  progress: Callable[[int], None] | None = None, intake: Intake | None = None) -> list[AddResult]:
        """Add edits in one transaction, in order.

        A spec whose fact (content hash) is already held by an active edit (proposed, pending, claimed,
        applied), or by an earlier spec of the same call, returns that edit with created=False. A new pending
        edit for the same subject and prompt as a pending one supersedes it (linked both ways, event on the
        old one); a proposed one supersedes it only when approved (ledger/review.py).

        Args:
            progress: called with the number of specs handled so far, now and then.
            intake: who submits and whether new edits need review (ledger.review.Intake); None = the
                current identity, no review. Its daily quota is checked here, before anything is written.
        Raises:
            QuotaExceeded: the identity's limit of edits per 24 hours.
        Returns:
            one AddResult per spec, in order.
        """
        results: list[AddResult] = []
        with self.session() as s:
            if self.dialect == "postgresql":
                s.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_ADD_LOCK})
            hashes = list(dict.fromkeys(sp.content_hash for sp in specs))
            keys = list(dict.fromkeys(sp.key_hash for sp in specs))
            by_hash: dict[str, tuple[int, str]] = {}
            for chunk in _chunks(hashes):
                rows = s.execute(select(Edit.content_hash, Edit.id, Edit.status)
                                 .where(Edit.content_hash.in_(chunk), Edit.status.in_([a.value for a in ACTIVE]))
                                 .order_by(Edit.id))
                for h, i, st in rows:
                    by_hash.setdefault(h, (i, st))
            pending_by_key: dict[str, int] = {}
            for chunk in _chunks(keys):
                rows = s.execute(select(Edit.key_hash, Edit.id)
                                 .where(Edit.key_hash.in_(chunk), Edit.status == EditStatus.PENDING.value)
                                 .order_by(Edit.id))
                for k, i in rows:
                    pending_by_key[k] = i

            now = utcnow()
            intake = intake or Intake(identity=session_identity(s))
            decide = intake_decider(s, intake, now)
            decisions: list[dict[str, Any]] = []  # review columns of each new edit, by its index
            # plan: which specs are new, and which earlier edit each new one supersedes (by spec index
            # for edits created in this call, by id for edits already in the table)
            plan: list[tuple[str, Any]] = []  # ("old", id) | ("new", (spec, supersedes_ref))
            new_index_by_hash: dict[str, int] = {}
            pending_ref_by_key: dict[str, tuple[str, int]] = {k: ("id", i) for k, i in pending_by_key.items()}
            n_new = 0
            for sp in specs:
                h = sp.content_hash
                if h in by_hash:
                    plan.append(("old", by_hash[h]))
                    continue
                if h in new_index_by_hash:
                    plan.append(("dup", new_index_by_hash[h]))
                    continue
                decisions.append(decide(sp))
                is_pending = decisions[-1]["status"] == EditStatus.PENDING.value  # proposed: supersedes on approval
                ref = pending_ref_by_key.get(sp.key_hash) if is_pending else None
                plan.append(("new", (sp, ref, n_new)))
                new_index_by_hash[h] = n_new
                if is_pending:
                    pending_ref_by_key[sp.key_hash] = ("new", n_new)
                n_new += 1
            check_daily_quota(s, intake, n_new, now)

            new_rows = [p[1] for p in plan if p[0] == "new"]
            ids = self._allocate_edit_ids(s, len(new_rows))
            step = 5000
            for start in range(0, len(new_rows), step):
                part = new_rows[start:start + step]
                got = ids[start:start + len(part)]
                values = [{
                    "id": edit_id, "subject": sp.subject, "prompt": sp.prompt, "target_new": sp.target_new,
                    "target_true": sp.target_true, "paraphrases": list(sp.paraphrases), "source": sp.source,
                    "aliases": list(sp.aliases),
                    "author": sp.author, "note": sp.note, "submitted_at": now, "updated_at": now,
                    "content_hash": sp.content_hash, "key_hash": sp.key_hash,
                    "attempts": 0, "supersedes_id": ref[1] if ref and ref[0] == "id" else None,
                    **{k: v for k, v in decisions[n].items() if not k.startswith("_")},
                } for edit_id, (sp, ref, n) in zip(got, part)]
                s.execute(Edit.__table__.insert(), values)
                s.execute(Event.__table__.insert(), [event_row("edit.created", actor=actor, edit_id=i, at=now,
                                                    payload=_created_payload(sp, decisions[n]))
                                          for i, (sp, _, n) in zip(got, part)])
                if progress:
                    progress(min(len(specs), start + len(part)))

            # supersede: old pending edit → superseded, linked both ways
            links: dict[int, int] = {}  # old id -> new id
            for sp, ref, n in new_rows:
                if ref is None:
                    continue
                old_id = ref[1] if ref[0] == "id" else ids[ref[1]]
                links[old_id] = ids[n]
            if links:
                transition(s, list(links), EditStatus.PENDING, EditStatus.SUPERSEDED, actor=actor,
                           reason="a newer edit for the same subject and prompt replaced it",
                           payload_by_id={o: {"superseded_by": n} for o, n in links.items()})
                s.execute(update(Edit), [{"id": o, "superseded_by_id": n} for o, n in links.items()])
                inner = [{"id": n, "supersedes_id": o} for o, n in links.items()]
                s.execute(update(Edit), inner)

            record_policy_approvals(s, intake, {ids[n]: d["_rule"] for n, d in enumerate(decisions) if "_rule" in d},
                                    now)
            superseded_by_new = {n: o for o, n in links.items()}
            final_status = {o: EditStatus.SUPERSEDED.value for o in links}
            for kind, value in plan:
                if kind == "old":
                    results.append(AddResult(id=value[0], created=False, status=value[1]))
                elif kind == "dup":
                    i = ids[value]
                    results.append(AddResult(id=i, created=False, status=final_status.get(i, decisions[value]["status"])))
                else:
                    i = ids[value[2]]
                    results.append(AddResult(id=i, created=True, superseded_id=superseded_by_new.get(i),
                                             status=final_status.get(i, decisions[value[2]]["status"])))
        if progress:
            progress(len(specs))
        return results

    def _allocate_edit_ids(self, s: Session, n: int) -> list[int]:
        """n fresh edit ids. Called under add_edits' lock (SQLite write lock / advisory lock), so plain
        inserts with explicit ids are safe and far faster than RETURNING row by row."""
        if n == 0:
            return []
        if self.dialect == "postgresql":
            seq = text("SELECT nextval(pg_get_serial_sequence('edits', 'id')) FROM generate_series(1, :n)")
            return sorted(s.execute(seq, {"n": n}).scalars())
        start = s.execute(select(func.coalesce(func.max(Edit.id), 0))).scalar_one() + 1
        return list(range(start, start + n))

    def cancel(self, edit_id: int, *, actor: str, reason: str | None = None) -> EditRecord:
        """pending (or proposed) → cancelled."""
        with self.session() as s:
            row = self._require_edit(s, edit_id)
            src = EditStatus.PROPOSED if row.status == EditStatus.PROPOSED.value else EditStatus.PENDING
            transition(s, [edit_id], src, EditStatus.CANCELLED, actor=actor,
                       reason=reason or "cancelled on request")
        return self.get_edit(edit_id)

    # ---- the daemon's side
    def claim_batch(self, n: int, *, base_model: str, actor: str = "daemon") -> ClaimedBatch | None:
        """Atomically claim up to n oldest pending edits into a new batch (status "claimed").

        Each edit gets the batch's claim_token, claimed_at = heartbeat_at = now, attempts += 1, batch_id.
        Only `pending` edits are claimed (never `proposed` ones), and at most `night_cap_per_identity` of any
        one submitter (the rest wait for the next batch). Returns None (and creates no batch) when nothing is
        pending.
        """
        if n <= 0:
            return None
        token = secrets.token_hex(16)
        now = utcnow()
        with self.session() as s:
            q = (select(Edit.id).where(Edit.status == EditStatus.PENDING.value).order_by(Edit.id).limit(n))
            if self.night_cap_per_identity > 0:
                q = q.where(night_cap_clause(self.night_cap_per_identity))
            if self.dialect == "postgresql":
                q = q.with_for_update(skip_locked=True)
            ids = list(s.execute(q).scalars())
            if not ids:
                return None
            batch = Batch(token=token, base_model=base_model, status="claimed", actor=actor, n_edits=len(ids),
                          started_at=now, metrics={})
            s.add(batch)
            s.flush()
            transition(s, ids, EditStatus.PENDING, EditStatus.CLAIMED, actor=actor, batch_id=batch.id,
                       values={"claim_token": token, "claimed_at": now, "heartbeat_at": now,
                               "attempts": Edit.attempts + 1})
            record_event(s, "batch.claimed", actor=actor, batch_id=batch.id,
                         payload={"n_edits": len(ids), "base_model": base_model}, at=now)
            cols = [Edit.__table__.c[name] for name in _EDIT_FIELDS]
            rows = s.execute(select(*cols).where(Edit.id.in_(ids)).order_by(Edit.id)).all()
            return ClaimedBatch(batch_id=batch.id, token=token, edits=[EditRecord.from_row(r) for r in rows])

    def heartbeat(self, token: str) -> int:
        """Refresh the claim of every edit still claimed under `token`; returns how many."""
        with self.session() as s:
            res = s.execute(update(Edit).where(Edit.claim_token == token, Edit.status == EditStatus.CLAIMED.value)
                            .values(heartbeat_at=utcnow()).execution_options(synchronize_session=False))
            return res.rowcount

    def release_batch(self, token: str, *, actor: str, reason: str, batch_status: str = "abandoned") -> list[int]:
        """Give every edit still claimed under `token` back to pending (claimed → pending) and mark the batch."""
        with self.session() as s:
            batch = s.execute(select(Batch).where(Batch.token == token)).scalar_one_or_none()
            if batch is None:
                raise BatchNotFound(f"no batch has the claim token {token!r}")
            ids = self._claimed_ids(s, Edit.claim_token == token)
            transition(s, ids, EditStatus.CLAIMED, EditStatus.PENDING, actor=actor, reason=reason,
                       values={"claim_token": None}, batch_id=None)
            batch.status, batch.finished_at, batch.error = batch_status, utcnow(), reason
            record_event(s, f"batch.{batch_status}", actor=actor, batch_id=batch.id, reason=reason,
                         payload={"released": ids})
            return ids

    def sweep_stale(self, stale_after_s: float, *, actor: str) -> list[int]:
        """Return edits whose claim has had no heartbeat for stale_after_s seconds to pending (with an event);
        batches left with no claimed edit become "abandoned". Returns the edit ids."""
        cutoff = utcnow() - timedelta(seconds=stale_after_s)
        with self.session() as s:
            stale = Edit.heartbeat_at < cutoff
            rows = s.execute(self._lock(select(Edit.id, Edit.batch_id)
                                        .where(Edit.status == EditStatus.CLAIMED.value, stale))).all()
            ids = [i for i, _ in rows]
            transition(s, ids, EditStatus.CLAIMED, EditStatus.PENDING, actor=actor,
                       reason=f"claim went stale: no heartbeat for {stale_after_s:g} s",
                       values={"claim_token": None})
            for batch_id in sorted({b for _, b in rows if b is not None}):
                still = s.execute(select(func.count()).select_from(Edit).where(
                    Edit.batch_id == batch_id, Edit.status == EditStatus.CLAIMED.value)).scalar_one()
                if still == 0:
                    s.execute(update(Batch).where(Batch.id == batch_id, Batch.status.in_(("claimed", "running")))
                              .values(status="abandoned", finished_at=utcnow(), error="claim went stale"))
                    record_event(s, "batch.abandoned", actor=actor, batch_id=batch_id, reason="claim went stale")
            return ids

    def retry_failed(self, max_attempts: int, *, actor: str) -> list[int]:
        """failed → pending for every failed edit tried fewer than max_attempts times; returns the ids."""
        with self.session() as s:
            ids = list(s.execute(self._lock(select(Edit.id).where(
                Edit.status == EditStatus.FAILED.value, Edit.attempts < max_attempts))).scalars())
            transition(s, ids, EditStatus.FAILED, EditStatus.PENDING, actor=actor,
                       reason=f"retry (fewer than {max_attempts} attempts)", values={"claim_token": None})
            return ids

    def _lock(self, q: Any) -> Any:
        return q.with_for_update(skip_locked=True) if self.dialect == "postgresql" else q

    def _claimed_ids(self, s: Session, cond: Any) -> list[int]:
        q = select(Edit.id).where(Edit.status == EditStatus.CLAIMED.value, cond).order_by(Edit.id)
        return list(s.execute(self._lock(q)).scalars())

    def update_batch(self, batch_id: int, *, actor: str, event_kind: str | None = None, **values: Any) -> None:
        """Set batch columns (status, finished_at, metrics, error, n_edits); records `batch.<status>` or
        `event_kind` when given."""
        with self.session() as s:
            batch = s.get(Batch, batch_id)
            if batch is None:
                raise BatchNotFound(f"no batch has id {batch_id}")
            for k, v in values.items():
                setattr(batch, k, v)
            kind = event_kind or (f"batch.{values['status']}" if "status" in values else None)
            if kind:
                record_event(s, kind, actor=actor, batch_id=batch_id, reason=values.get("error"))

    # ---- queries
    def get_edit(self, edit_id: int) -> EditRecord:
        with self.session(write=False) as s:
            return EditRecord.from_row(self._require_edit(s, edit_id))

    def get_edits(self, ids: Sequence[int]) -> list[EditRecord]:
        out: list[EditRecord] = []
        with self.session(write=False) as s:
            for chunk in _chunks(list(ids)):
                rows = s.execute(select(Edit).where(Edit.id.in_(chunk)).order_by(Edit.id)).scalars()
                out.extend(EditRecord.from_row(r) for r in rows)
        return out

    @staticmethod
    def _require_edit(s: Session, edit_id: int) -> Edit:
        row = s.get(Edit, edit_id)
        if row is None:
            raise EditNotFound(f"no edit has id {edit_id}; see `horse-ledger list` for the ids that exist")
        return row

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


def _has_version_table(conn: Any) -> bool:
    from sqlalchemy import inspect

    return inspect(conn).has_table("alembic_version")


def _chunks(items: list[Any], size: int = _IN_CHUNK) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


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
