"""The ledger's tables as SQLAlchemy 2.0 `Mapped` models.

The schema itself exists only through the Alembic migrations in `migrations/`; these classes must agree
with them (tests/ledger/test_migrations.py runs autogenerate and expects no difference).

Rules: every constraint and index has an explicit name (the naming convention below fills in the rest);
timestamps are timezone-aware UTC (`utcnow()`); `edits.status` is written only by `ledger.status`;
`events` is append-only (a database trigger refuses UPDATE and DELETE).
"""
from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (JSON, BigInteger, CheckConstraint, DateTime, ForeignKey, Index, Integer, MetaData,
                        String, Text, text)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

MAX_FIELD_CHARS = 2000
EDIT_STATUSES = ("pending", "claimed", "applied", "failed", "rejected", "cancelled", "superseded", "rolled_back",
                 "proposed")
REVIEW_DECISIONS = ("approved", "rejected")
SNAPSHOT_STATUSES = ("published", "rolled_back")
SNAPSHOT_KINDS = ("incremental", "consolidated", "routed")


def utcnow() -> datetime:
    """Now, timezone-aware UTC. SQLite drops the zone on the way in; `as_utc` puts it back."""
    return datetime.now(UTC)


def as_utc(value: datetime | None) -> datetime | None:
    """A datetime read back from either backend, as timezone-aware UTC."""
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {datetime: DateTime(timezone=True), dict[str, Any]: JSON, list[str]: JSON}


class Batch(Base):
    """One run of the daemon over a set of claimed edits. `status` is the daemon's (claimed, running,
    published, rejected, failed, abandoned)."""

    __tablename__ = "batches"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    token: Mapped[str] = mapped_column(String(64), unique=True)
    base_model: Mapped[str] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(32))
    actor: Mapped[str] = mapped_column(String(200))
    n_edits: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    started_at: Mapped[datetime]
    finished_at: Mapped[datetime | None]
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    error: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (Index("ix_batches_status_id", "status", "id"),)


class Snapshot(Base):
    """A weight-delta file on disk, its parent in the chain, and the batch that made it."""

    __tablename__ = "snapshots"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("snapshots.id"), index=True)
    batch_id: Mapped[int | None] = mapped_column(ForeignKey("batches.id"), index=True)
    base_model: Mapped[str] = mapped_column(String(200), index=True)
    kind: Mapped[str] = mapped_column(String(16), server_default=text("'incremental'"))
    path: Mapped[str] = mapped_column(String(1000))
    sha256: Mapped[str] = mapped_column(String(64))
    bytes: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime]
    status: Mapped[str] = mapped_column(String(16), server_default=text("'published'"))
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)

    __table_args__ = (
        CheckConstraint(_in("status", SNAPSHOT_STATUSES), name="status"),
        CheckConstraint(_in("kind", SNAPSHOT_KINDS), name="kind"),
    )


class Edit(Base):
    """One submitted fact and where it stands. `status` moves only through `ledger.status.transition`."""

    __tablename__ = "edits"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    subject: Mapped[str] = mapped_column(String(MAX_FIELD_CHARS))
    prompt: Mapped[str] = mapped_column(String(MAX_FIELD_CHARS))
    target_new: Mapped[str] = mapped_column(String(MAX_FIELD_CHARS))
    target_true: Mapped[str | None] = mapped_column(String(MAX_FIELD_CHARS))
    paraphrases: Mapped[list[str]] = mapped_column(JSON, default=list)
    # other names of the subject (migration 0002); not part of content_hash or key_hash
    # (jsonb on PostgreSQL: json has no `=`, which comparing the server default needs)
    aliases: Mapped[list[str]] = mapped_column(JSON().with_variant(JSONB(), "postgresql"), default=list,
                                               server_default=text("'[]'"))
    # provenance
    source: Mapped[str | None] = mapped_column(String(MAX_FIELD_CHARS))
    author: Mapped[str | None] = mapped_column(String(MAX_FIELD_CHARS))
    note: Mapped[str | None] = mapped_column(String(MAX_FIELD_CHARS))
    submitted_at: Mapped[datetime]
    # review (migration 0003): who submitted (OS user / PostgreSQL current_user, never typed in), the decision
    # (approved | rejected, NULL = not reviewed), who made it (an identity, or policy:<name>) and when
    submitted_by: Mapped[str | None] = mapped_column(String(200))
    review: Mapped[str | None] = mapped_column(String(16))
    reviewed_by: Mapped[str | None] = mapped_column(String(200))
    reviewed_at: Mapped[datetime | None]
    # sha256 of the fact (subject, prompt, target_new, target_true): same hash while active = same edit
    content_hash: Mapped[str] = mapped_column(String(64), index=True)
    # sha256 of (subject, prompt): a new edit with the same key supersedes an older pending one
    key_hash: Mapped[str] = mapped_column(String(64), index=True)
    status: Mapped[str] = mapped_column(String(16))
    updated_at: Mapped[datetime]
    # daemon bookkeeping
    attempts: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    batch_id: Mapped[int | None] = mapped_column(ForeignKey("batches.id"), index=True)
    snapshot_id: Mapped[int | None] = mapped_column(ForeignKey("snapshots.id"), index=True)
    claim_token: Mapped[str | None] = mapped_column(String(64), index=True)
    claimed_at: Mapped[datetime | None]
    heartbeat_at: Mapped[datetime | None]
    last_error: Mapped[str | None] = mapped_column(Text)
    supersedes_id: Mapped[int | None] = mapped_column(ForeignKey("edits.id"))
    superseded_by_id: Mapped[int | None] = mapped_column(ForeignKey("edits.id"))

    __table_args__ = (
        CheckConstraint(_in("status", EDIT_STATUSES), name="status"),
        CheckConstraint("attempts >= 0", name="attempts_nonnegative"),
        # list --status S (newest first) and claim_batch (oldest pending first) walk this index
        Index("ix_edits_status_id", "status", "id"),
        # sweep_stale: claimed edits by heartbeat age
        Index("ix_edits_status_heartbeat_at", "status", "heartbeat_at"),
        Index("ix_edits_submitted_at", "submitted_at"),
        # the per-identity quota counts an identity's recent edits
        Index("ix_edits_submitted_by_submitted_at", "submitted_by", "submitted_at"),
        CheckConstraint("review IS NULL OR " + _in("review", REVIEW_DECISIONS), name="review"),
    )

    @property
    def rendered_prompt(self) -> str:
        return render_prompt(self.prompt, self.subject)


class SnapshotEdit(Base):
    """Which edits a snapshot carries (a consolidated snapshot carries every edit of its chain)."""

    __tablename__ = "snapshot_edits"

    snapshot_id: Mapped[int] = mapped_column(ForeignKey("snapshots.id", ondelete="CASCADE"), primary_key=True)
    edit_id: Mapped[int] = mapped_column(ForeignKey("edits.id"), primary_key=True, index=True)


class Head(Base):
    """The snapshot currently served for each base model; snapshot_id NULL = the unedited base."""

    __tablename__ = "heads"

    base_model: Mapped[str] = mapped_column(String(200), primary_key=True)
    snapshot_id: Mapped[int | None] = mapped_column(ForeignKey("snapshots.id"))
    updated_at: Mapped[datetime]


class Event(Base):
    """The append-only audit trail. Ids are plain columns, not foreign keys, so the trail outlives anything."""

    __tablename__ = "events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(index=True)
    actor: Mapped[str] = mapped_column(String(200))
    kind: Mapped[str] = mapped_column(String(64))
    edit_id: Mapped[int | None] = mapped_column(Integer, index=True)
    batch_id: Mapped[int | None] = mapped_column(Integer, index=True)
    snapshot_id: Mapped[int | None] = mapped_column(Integer, index=True)
    reason: Mapped[str | None] = mapped_column(Text)
    payload: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class ProtectedFact(Base):
    """A fact the gate checks after every batch: it must still hold, or the batch is rejected."""

    __tablename__ = "protected_facts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    subject: Mapped[str | None] = mapped_column(String(MAX_FIELD_CHARS))
    prompt: Mapped[str] = mapped_column(String(MAX_FIELD_CHARS))
    target: Mapped[str] = mapped_column(String(MAX_FIELD_CHARS))
    note: Mapped[str | None] = mapped_column(String(MAX_FIELD_CHARS))
    author: Mapped[str | None] = mapped_column(String(MAX_FIELD_CHARS))
    created_at: Mapped[datetime]

    @property
    def rendered_prompt(self) -> str:
        return render_prompt(self.prompt, self.subject or "")


def render_prompt(prompt: str, subject: str) -> str:
    """The prompt with `{}` replaced by the subject, or the prompt itself when it has no `{}`."""
    return prompt.replace("{}", subject) if "{}" in prompt else prompt
