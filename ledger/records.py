"""Read-only copies of ledger rows, as `Store` returns them: edits, events, batches, protected facts, and what
`add_edits` and `claim_batch` give back. Plain frozen dataclasses with `from_row` and `to_dict` (JSON-ready)."""
from __future__ import annotations

from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any

from ledger.models import Batch, Event, ProtectedFact, as_utc, render_prompt
from ledger.status import EditStatus

__all__ = ["EditRecord", "AddResult", "ClaimedBatch", "EventRecord", "BatchRecord", "ProtectedFactRecord",
           "EDIT_FIELDS"]


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
        values = {name: get(name) for name in EDIT_FIELDS}
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


EDIT_FIELDS = tuple(f.name for f in fields(EditRecord))


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


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        return as_utc(value).isoformat().replace("+00:00", "Z")
    return value
