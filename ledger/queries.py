"""Read-only queries for the operator views: the web view (`horse-ledger serve`), Prometheus metrics, plots.

Owns: filtered and paginated edit search, the nights (batches) with the edits they rejected and why, and
one row per snapshot with the numbers its gate measured, in the shape the charts draw. Nothing here writes:
every query runs in `Store.session(write=False)`.

    page = search_edits(store, EditQuery(status=("applied",), text="Paris", page=2))
    nights = list_nights(store, limit=30)          # newest first, each with its rejected edits and reasons
    rows = snapshot_series(store, "smollm2-135m")   # oldest first, accumulated edits and gate numbers
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Sequence

from sqlalchemy import Text, cast, func, or_, select

from ledger.models import Batch, Edit, Event, Snapshot, SnapshotEdit, as_utc
from ledger.status import EditStatus
from ledger.records import BatchRecord, EditRecord, _jsonable
from ledger.store import Store, snapshot_chain_in

MAX_PER_PAGE = 200
# Where a snapshot's metrics keep each charted number, first match wins (a night's gate, or a fold's).
SERIES_PATHS: dict[str, tuple[tuple[str, ...], ...]] = {
    "canary_agreement": (("gate", "canary_agreement"),),
    "retention": (("gate", "retention"),),
    "retention_abs": (("gate", "retention_abs"),),
    "ns": (("gate", "ns"), ("gate", "cf_ns"), ("ns",), ("cf_ns",)),
    "perplexity": (("gate", "perplexity_ratio"), ("gate", "perplexity"), ("perplexity_ratio",), ("perplexity",)),
    "efficacy_mean": (("efficacy_mean",),),
    "delta_norm_max": (("cumulative_norm_max",), ("gate", "delta_norm_max")),
}


@dataclass(frozen=True)
class EditQuery:
    """Filters of the edit list. Text filters match a case-insensitive substring; dates are UTC, inclusive."""

    status: tuple[str, ...] = ()
    subject: str = ""
    source: str = ""
    author: str = ""
    text: str = ""  # any of subject, prompt, targets, paraphrases, source, author, note
    since: datetime | None = None
    until: datetime | None = None
    page: int = 1
    per_page: int = 50


@dataclass(frozen=True)
class EditPage:
    """One page of matching edits, newest first, and how many match in all."""

    edits: list[EditRecord]
    total: int
    page: int
    per_page: int

    @property
    def pages(self) -> int:
        return max(1, -(-self.total // self.per_page))

    def to_dict(self) -> dict[str, Any]:
        return {"total": self.total, "page": self.page, "per_page": self.per_page, "pages": self.pages,
                "edits": [e.to_dict() for e in self.edits]}


@dataclass(frozen=True)
class Night:
    """One batch the daemon ran: its record and the edits it rejected or failed, with their reasons."""

    batch: BatchRecord
    snapshot_id: int | None
    rejected: list[dict[str, Any]] = field(default_factory=list)  # {edit_id, status, reason, subject}

    def to_dict(self) -> dict[str, Any]:
        return {**self.batch.to_dict(), "snapshot_id": self.snapshot_id, "rejected": self.rejected}


def _contains(column: Any, needle: str) -> Any:
    # lower() is ASCII-only on SQLite: also match the text as given (as Store.list_edits does)
    return or_(column.contains(needle, autoescape=True), func.lower(column).contains(needle.lower(), autoescape=True))


def _edit_filters(q: EditQuery) -> list[Any]:
    conds: list[Any] = []
    if q.status:
        conds.append(Edit.status.in_([EditStatus(s).value for s in q.status]))
    for column, needle in ((Edit.subject, q.subject), (Edit.source, q.source), (Edit.author, q.author)):
        if needle:
            conds.append(_contains(column, needle))
    if q.text:
        columns = (Edit.subject, Edit.prompt, Edit.target_new, Edit.target_true, Edit.source, Edit.author, Edit.note)
        conds.append(or_(*(_contains(c, q.text) for c in columns),
                         _contains(cast(Edit.paraphrases, Text), q.text)))
    if q.since is not None:
        conds.append(Edit.submitted_at >= q.since)
    if q.until is not None:
        conds.append(Edit.submitted_at <= q.until)
    return conds


def search_edits(store: Store, query: EditQuery) -> EditPage:
    """The page `query.page` (from 1) of edits matching every filter of `query`, newest first."""
    per_page = max(1, min(query.per_page, MAX_PER_PAGE))
    page = max(1, query.page)
    conds = _edit_filters(query)
    with store.session(write=False) as s:
        total = int(s.execute(select(func.count()).select_from(Edit).where(*conds)).scalar_one())
        rows = s.execute(select(Edit).where(*conds).order_by(Edit.id.desc())
                         .offset((page - 1) * per_page).limit(per_page)).scalars()
        return EditPage([EditRecord.from_row(r) for r in rows], total, page, per_page)


def _refused(s: Any, batch_ids: Sequence[int]) -> dict[int, list[dict[str, Any]]]:
    """batch id → the edits it rejected or failed: {edit_id, status, reason, subject}, in event order."""
    out: dict[int, list[dict[str, Any]]] = {}
    if not batch_ids:
        return out
    rows = s.execute(select(Event.batch_id, Event.edit_id, Event.kind, Event.reason, Edit.subject)
                     .join(Edit, Edit.id == Event.edit_id, isouter=True)
                     .where(Event.batch_id.in_(list(batch_ids)), Event.kind.in_(["edit.rejected", "edit.failed"]))
                     .order_by(Event.id))
    for batch_id, edit_id, kind, reason, subject in rows:
        out.setdefault(batch_id, []).append({"edit_id": edit_id, "status": kind.split(".", 1)[1],
                                             "reason": reason, "subject": subject})
    return out


def list_nights(store: Store, *, limit: int = 50, base_model: str | None = None,
                batch_id: int | None = None) -> list[Night]:
    """The newest `limit` batches (or the one `batch_id`), newest first, each with the snapshot it published
    and the edits it rejected or failed, with their reasons."""
    q = select(Batch).order_by(Batch.id.desc()).limit(limit)
    if base_model is not None:
        q = q.where(Batch.base_model == base_model)
    if batch_id is not None:
        q = q.where(Batch.id == batch_id)
    with store.session(write=False) as s:
        batches = [BatchRecord.from_row(b) for b in s.execute(q).scalars()]
        ids = [b.id for b in batches]
        snaps = dict(s.execute(select(Snapshot.batch_id, Snapshot.id).where(Snapshot.batch_id.in_(ids))).all()) \
            if ids else {}
        refused = _refused(s, ids)
    return [Night(b, snaps.get(b.id), refused.get(b.id, [])) for b in batches]


def get_night(store: Store, batch_id: int) -> Night:
    """One batch as a Night. Raises BatchNotFound when there is none."""
    store.get_batch(batch_id)  # raises with what to do
    return list_nights(store, limit=1, batch_id=batch_id)[0]


def _get(d: Any, path: Sequence[str]) -> Any:
    for key in path:
        if not isinstance(d, dict):
            return None
        d = d.get(key)
    return d if isinstance(d, (int, float)) and not isinstance(d, bool) else None


def series_value(metrics: dict[str, Any] | None, name: str) -> float | None:
    """The charted number `name` (a key of SERIES_PATHS) from a snapshot's metrics, or None when absent."""
    for path in SERIES_PATHS[name]:
        value = _get(metrics or {}, path)
        if value is not None:
            return float(value)
    return None


def snapshot_series(store: Store, base_model: str) -> list[dict[str, Any]]:
    """Every snapshot of `base_model`, oldest first: id, parent, kind, status, created_at, the edits it adds
    (`n_edits`), the edits the model at it carries (`accumulated_edits`), `is_head`, and each SERIES_PATHS
    number (None when the night did not measure it)."""
    with store.session(write=False) as s:
        counts = dict(s.execute(select(SnapshotEdit.snapshot_id, func.count()).group_by(SnapshotEdit.snapshot_id)
                                .join(Snapshot, Snapshot.id == SnapshotEdit.snapshot_id)
                                .where(Snapshot.base_model == base_model)).all())
        snaps = list(s.execute(select(Snapshot).where(Snapshot.base_model == base_model)
                               .order_by(Snapshot.id)).scalars())
    heads = store.heads()
    head = heads.get(base_model)
    carried: dict[int, int] = {}
    rows = []
    for snap in snaps:
        n = int(counts.get(snap.id, 0))
        # a consolidated snapshot lists every edit it carries; an incremental one only those it adds
        below = carried.get(snap.parent_id, 0) if snap.parent_id is not None and snap.kind != "consolidated" else 0
        carried[snap.id] = below + n
        m = snap.metrics or {}
        rows.append({"id": snap.id, "parent_id": snap.parent_id, "batch_id": snap.batch_id, "kind": snap.kind,
                     "status": snap.status, "is_head": snap.id == head, "bytes": snap.bytes,
                     "created_at": _jsonable(as_utc(snap.created_at)), "n_edits": n,
                     "accumulated_edits": carried[snap.id], "chain_length": m.get("chain_length"),
                     **{name: series_value(m, name) for name in SERIES_PATHS}})
    return rows


def base_models(store: Store) -> list[str]:
    """Every base model that has a head or a snapshot, sorted."""
    with store.session(write=False) as s:
        names = set(s.execute(select(Snapshot.base_model).distinct()).scalars())
    return sorted(names | set(store.heads()))


def last_night(store: Store, *, status: str | None = None) -> BatchRecord | None:
    """The newest batch (with this batch status, e.g. "published"), or None."""
    q = select(Batch).order_by(Batch.id.desc()).limit(1)
    if status is not None:
        q = q.where(Batch.status == status)
    with store.session(write=False) as s:
        row = s.execute(q).scalar_one_or_none()
        return BatchRecord.from_row(row) if row is not None else None


def chain_lengths(store: Store) -> dict[str, int]:
    """base model → snapshots on its head's chain (0 for the unedited base), for every model with a head."""
    with store.session(write=False) as s:
        return {model: len(snapshot_chain_in(s, snap)) for model, snap in store.heads().items()}
