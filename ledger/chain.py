"""The ledger's side of a night: every row a night writes, in one place (the daemon calls these; it writes no rows
or status strings itself).

- `BatchStatus` and `move_batch` (from `ledger.batch_status`): a batch's status changes only there, along
  `BATCH_MOVES`.
- crash recovery: `ledger.recovery.recover_claims` (edits of a crashed batch back to pending, or failed at
  max_attempts; the batch abandoned); `snapshot_paths` for the orphan sweep.
- `publish_night`: ONE transaction — the snapshot row, its edits, the head, applied / failed / rejected /
  returned edits with their events, supersessions, the batch row.
- `finish_night`: the same without a snapshot (nothing published).
- the joint night's (daemon/joint_*.py) and a fold's (daemon/consolidate.py) rows: `publish_joint_night`,
  `finish_joint_night`, `publish_fold`, `record_fold_rejected`, and what they read of a chain (`applied_edits_on`,
  `key_hashes`, `first_unkept_edit`, `published_snapshot_ids`).
"""
from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import insert, select, update

from ledger.batch_status import BATCH_MOVES, BatchStatus, IllegalBatchMove, move_batch  # noqa: F401 - re-exported
from ledger.errors import LedgerError
from ledger.events import json_safe, record_event
from ledger.models import Batch, Edit, Head, Snapshot, SnapshotEdit, utcnow
from ledger.records import EditRecord
from ledger.snapshot_reads import model_snapshot_paths
from ledger.status import EditStatus, SnapshotStatus, transition
from ledger.store import Store, set_head


class HeadMoved(LedgerError):
    """The head moved while the night ran; nothing was published and the batch will be retried."""


def snapshot_paths(store: Store, base_model: str) -> list[str]:
    """Every path a snapshot row of this model names (files not listed are orphans)."""
    with store.session(write=False) as s:
        return model_snapshot_paths(s, base_model)


@dataclass
class NightOutcome:
    """What a night decided for its claimed edits (reasons are what `show` prints; payloads go to the events)."""

    applied: list[int] = field(default_factory=list)
    failed: dict[int, str] = field(default_factory=dict)
    rejected: dict[int, str] = field(default_factory=dict)
    returned: dict[int, str] = field(default_factory=dict)   # undecided: back to pending, not rejected
    payloads: dict[int, dict[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True)
class NewSnapshot:
    parent_id: int | None
    base_model: str
    kind: str
    path: str
    sha256: str
    bytes: int
    metrics: dict[str, Any]
    carried: list[int]   # every edit the snapshot lists (snapshot_edits)


def _settle_edits(s, batch_id: int, outcome: NightOutcome, actor: str) -> None:
    for ids, dst in ((outcome.failed, EditStatus.FAILED), (outcome.rejected, EditStatus.REJECTED)):
        for i, reason in sorted(ids.items()):
            transition(s, [i], EditStatus.CLAIMED, dst, actor=actor, reason=reason, batch_id=batch_id,
                       payload=outcome.payloads.get(i), values={"claim_token": None, "last_error": reason[:1900]})
    for i, reason in sorted(outcome.returned.items()):
        transition(s, [i], EditStatus.CLAIMED, EditStatus.PENDING, actor=actor, reason=reason, batch_id=batch_id,
                   payload=outcome.payloads.get(i), values={"claim_token": None, "last_error": reason[:1900]})


def _supersede(s, batch_id: int, applied: Sequence[int], snapshot_id: int, actor: str) -> list[int]:
    """Applied edits of the same subject and prompt as a newly applied one become superseded by it."""
    new_by_key = {e.key_hash: e.id for e in s.execute(select(Edit).where(Edit.id.in_(list(applied)))).scalars()}
    older = s.execute(select(Edit.id, Edit.key_hash).where(
        Edit.key_hash.in_(list(new_by_key)), Edit.status == EditStatus.APPLIED.value,
        Edit.id.not_in(list(applied)))).all()
    links = {old_id: new_by_key[key] for old_id, key in older}
    if links:
        transition(s, sorted(links), EditStatus.APPLIED, EditStatus.SUPERSEDED, actor=actor, batch_id=batch_id,
                   reason="a newer applied edit of the same subject and prompt replaced it",
                   payload_by_id={o: {"superseded_by": n, "in_snapshot": snapshot_id} for o, n in links.items()})
        s.execute(update(Edit), [{"id": o, "superseded_by_id": n} for o, n in links.items()])
    return sorted(links)


def publish_night(store: Store, *, batch_id: int, expected_head: int | None, snapshot: NewSnapshot,
                  outcome: NightOutcome, batch_metrics: dict[str, Any], actor: str) -> int:
    """Publish a night's snapshot and settle every claimed edit, in one transaction. Returns the snapshot id.

    Raises:
        HeadMoved: the head is no longer `expected_head` (another writer published); nothing is written.
    """
    with store.session() as s:
        current = s.execute(select(Head.snapshot_id).where(Head.base_model == snapshot.base_model)).scalar_one_or_none()
        if current != expected_head:
            raise HeadMoved(f"the head of {snapshot.base_model} moved from {expected_head} to {current} during batch "
                            f"{batch_id}; nothing was published, the batch will be retried")
        snap = Snapshot(parent_id=snapshot.parent_id, batch_id=batch_id, base_model=snapshot.base_model,
                        kind=snapshot.kind, path=snapshot.path, sha256=snapshot.sha256, bytes=snapshot.bytes,
                        created_at=utcnow(), status=SnapshotStatus.PUBLISHED.value, metrics=json_safe(snapshot.metrics))
        s.add(snap)
        s.flush()
        if snapshot.carried:
            s.execute(insert(SnapshotEdit), [{"snapshot_id": snap.id, "edit_id": i} for i in snapshot.carried])
        set_head(s, snapshot.base_model, snap.id, actor=actor, reason=f"batch {batch_id} published")
        transition(s, outcome.applied, EditStatus.CLAIMED, EditStatus.APPLIED, actor=actor, batch_id=batch_id,
                   snapshot_id=snap.id, values={"claim_token": None, "last_error": None},
                   payload_by_id={i: outcome.payloads.get(i) for i in outcome.applied})
        superseded = _supersede(s, batch_id, outcome.applied, snap.id, actor)
        _settle_edits(s, batch_id, outcome, actor)
        move_batch(s, batch_id, BatchStatus.PUBLISHED, actor=actor,
                   metrics={**batch_metrics, "snapshot_id": snap.id, "superseded": superseded})
        record_event(s, "snapshot.published", actor=actor, batch_id=batch_id, snapshot_id=snap.id,
                     payload={"parent": snapshot.parent_id, "path": snapshot.path, "sha256": snapshot.sha256,
                              "bytes": snapshot.bytes, "n_edits": len(outcome.applied)})
        return snap.id


def finish_night(store: Store, *, batch_id: int, outcome: NightOutcome, batch_metrics: dict[str, Any],
                 actor: str) -> BatchStatus:
    """Settle a night that published nothing; the batch becomes rejected (the gate refused something) or
    failed."""
    status = BatchStatus.REJECTED if outcome.rejected else BatchStatus.FAILED
    with store.session() as s:
        _settle_edits(s, batch_id, outcome, actor)
        move_batch(s, batch_id, status, actor=actor, metrics=batch_metrics,
                   reason=(f"nothing published: {len(outcome.failed)} failed, {len(outcome.rejected)} rejected, "
                           f"{len(outcome.returned)} returned to pending"))
    return status


def fail_batch(store: Store, *, batch_id: int, token: str, reason: str, timings: Mapping[str, float],
               actor: str) -> list[int]:
    """An error inside the night: edits still claimed by it become failed (retried up to max_attempts)."""
    with store.session() as s:
        ids = list(s.execute(select(Edit.id).where(Edit.claim_token == token,
                                                   Edit.status == EditStatus.CLAIMED.value)).scalars())
        transition(s, ids, EditStatus.CLAIMED, EditStatus.FAILED, actor=actor, reason=reason, batch_id=batch_id,
                   values={"claim_token": None, "last_error": reason})
        batch = s.get(Batch, batch_id)
        if batch is not None and batch.status in (BatchStatus.CLAIMED.value, BatchStatus.RUNNING.value):
            batch.metrics = {**(batch.metrics or {}), "timings_s": dict(timings)}
            move_batch(s, batch_id, BatchStatus.FAILED, actor=actor, reason=reason)
    return ids


# ------------------------------------------------------------------ the joint night (scope = subject | off), folds

def published_snapshot_ids(store: Store, base_model: str) -> list[int]:
    """The ids of this model's published snapshots (the caches of any other are pruned)."""
    with store.session(write=False) as s:
        return list(s.execute(select(Snapshot.id).where(Snapshot.base_model == base_model,
                                                        Snapshot.status == SnapshotStatus.PUBLISHED.value)).scalars())


def applied_edits_on(session, snapshot_ids: Sequence[int], *, except_keys: Collection[str] = ()) -> list[EditRecord]:
    """The edits the snapshots `snapshot_ids` list that are applied now, by id, less those whose (subject, prompt)
    key hash is in `except_keys`."""
    if not snapshot_ids:
        return []
    rows = session.execute(select(Edit).join(SnapshotEdit, SnapshotEdit.edit_id == Edit.id)
                           .where(SnapshotEdit.snapshot_id.in_(list(snapshot_ids)),
                                  Edit.status == EditStatus.APPLIED.value).order_by(Edit.id)).scalars().unique().all()
    return [EditRecord.from_row(r) for r in rows if r.key_hash not in except_keys]


def key_hashes(session, edit_ids: Sequence[int]) -> set[str]:
    """The (subject, prompt) key hashes of these edits."""
    return set(session.execute(select(Edit.key_hash).where(Edit.id.in_(list(edit_ids)))).scalars())


def first_unkept_edit(session, snapshot_id: int) -> int | None:
    """An edit the snapshot lists that is neither applied nor superseded now (None when there is none)."""
    return session.execute(select(Edit.id).join(SnapshotEdit, SnapshotEdit.edit_id == Edit.id).where(
        SnapshotEdit.snapshot_id == snapshot_id,
        Edit.status.not_in([EditStatus.APPLIED.value, EditStatus.SUPERSEDED.value])).limit(1)).scalar()


def publish_joint_night(store: Store, *, batch_id: int, expected_head: int | None, snapshot: NewSnapshot,
                        outcome: NightOutcome, batch_metrics: Callable[[int], dict[str, Any]],
                        actor: str) -> int:
    """The joint night's publish, in one transaction: as `publish_night` (the metrics stored as given), with the
    batch's metrics from `batch_metrics(snapshot_id)`, called once the edits have moved, and its
    `batch.published` event (with the counts) after `snapshot.published`. Returns the snapshot id.

    Raises:
        HeadMoved: the head is no longer `expected_head`; nothing is written.
    """
    with store.session() as s:
        current = s.execute(select(Head.snapshot_id).where(Head.base_model == snapshot.base_model)).scalar_one_or_none()
        if current != expected_head:
            raise HeadMoved(f"the head of {snapshot.base_model} moved from {expected_head} to {current} during batch "
                            f"{batch_id}; nothing was published, the batch will be retried")
        snap = Snapshot(parent_id=snapshot.parent_id, batch_id=batch_id, base_model=snapshot.base_model,
                        kind=snapshot.kind, path=snapshot.path, sha256=snapshot.sha256, bytes=snapshot.bytes,
                        created_at=utcnow(), status=SnapshotStatus.PUBLISHED.value, metrics=snapshot.metrics)
        s.add(snap)
        s.flush()
        s.execute(insert(SnapshotEdit), [{"snapshot_id": snap.id, "edit_id": i} for i in snapshot.carried])
        set_head(s, snapshot.base_model, snap.id, actor=actor, reason=f"batch {batch_id} published")
        transition(s, outcome.applied, EditStatus.CLAIMED, EditStatus.APPLIED, actor=actor, batch_id=batch_id,
                   snapshot_id=snap.id, values={"claim_token": None, "last_error": None},
                   payload_by_id={i: outcome.payloads.get(i) for i in outcome.applied})
        _supersede(s, batch_id, outcome.applied, snap.id, actor)
        _settle_edits(s, batch_id, outcome, actor)
        s.get(Batch, batch_id).metrics = batch_metrics(snap.id)
        record_event(s, "snapshot.published", actor=actor, batch_id=batch_id, snapshot_id=snap.id,
                     payload={"parent": expected_head, "path": snapshot.path, "sha256": snapshot.sha256,
                              "bytes": snapshot.bytes, "n_edits": len(outcome.applied)})
        move_batch(s, batch_id, BatchStatus.PUBLISHED, actor=actor, snapshot_id=snap.id,
                   payload={"n_applied": len(outcome.applied), "n_failed": len(outcome.failed),
                            "n_rejected": len(outcome.rejected)})
        return snap.id


def finish_joint_night(store: Store, *, batch_id: int, outcome: NightOutcome, status: BatchStatus,
                       batch_metrics: dict[str, Any], reason: str, actor: str) -> None:
    """A joint night that published nothing: its edits settled, the batch `status` (rejected or failed) with
    `reason` and the metrics as given."""
    with store.session() as s:
        _settle_edits(s, batch_id, outcome, actor)
        s.get(Batch, batch_id).metrics = batch_metrics
        move_batch(s, batch_id, status, actor=actor, reason=reason)


def record_fold_rejected(store: Store, *, head: int | None, reason: str, payload: dict[str, Any], actor: str) -> None:
    """A consolidation the gate refused: only its `consolidation.rejected` event."""
    with store.session() as s:
        record_event(s, "consolidation.rejected", actor=actor, snapshot_id=head, reason=reason, payload=payload)


def publish_fold(store: Store, *, expected_head: int | None, snapshot: NewSnapshot, reason: str, chain_length: int,
                 actor: str) -> int:
    """Publish a consolidated snapshot (no parent, no batch; its edits stay applied) and move the head to it, in
    one transaction, with a `snapshot.consolidated` event. Returns its id.

    Raises:
        HeadMoved: the head is no longer `expected_head`; nothing is written.
    """
    with store.session() as s:
        current = s.execute(select(Head.snapshot_id).where(Head.base_model == snapshot.base_model)).scalar_one_or_none()
        if current != expected_head:
            raise HeadMoved(f"the head of {snapshot.base_model} moved during consolidation; nothing was published")
        snap = Snapshot(parent_id=None, batch_id=None, base_model=snapshot.base_model, kind=snapshot.kind,
                        path=snapshot.path, sha256=snapshot.sha256, bytes=snapshot.bytes, created_at=utcnow(),
                        status=SnapshotStatus.PUBLISHED.value, metrics=snapshot.metrics)
        s.add(snap)
        s.flush()
        s.execute(insert(SnapshotEdit), [{"snapshot_id": snap.id, "edit_id": i} for i in snapshot.carried])
        set_head(s, snapshot.base_model, snap.id, actor=actor,
                 reason=f"consolidation of snapshot {expected_head}: {reason}")
        record_event(s, "snapshot.consolidated", actor=actor, snapshot_id=snap.id, reason=reason,
                     payload={"from": expected_head, "chain_length": chain_length, "n_edits": len(snapshot.carried),
                              "path": snapshot.path, "sha256": snapshot.sha256, "bytes": snapshot.bytes})
        return snap.id
