"""Read-only queries on snapshots the daemon needs (materialise, audit, verify, export, rollback), in the
caller's session: the daemon runs no SQL of its own.

    with store.session(write=False) as s:
        head = head_id(s, "smollm2-135m")
        ids = snapshot_edit_ids(s, head)
"""
from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from ledger.errors import SnapshotNotFound
from ledger.models import Edit, Head, Snapshot, SnapshotEdit
from ledger.store import snapshot_chain_in


def head_id(session: Session, base_model: str) -> int | None:
    """The head snapshot id of a base model (None = the unedited base)."""
    return session.execute(select(Head.snapshot_id).where(Head.base_model == base_model)).scalar_one_or_none()


def snapshot_of(session: Session, base_model: str, ref: int | None) -> Snapshot | None:
    """The snapshot row `ref` of `base_model` (None for the base); raises SnapshotNotFound otherwise."""
    if ref is None:
        return None
    snap = session.get(Snapshot, ref)
    if snap is None or snap.base_model != base_model:
        raise SnapshotNotFound(f"{base_model} has no snapshot {ref}; see `horse-ledger snapshots`")
    return snap


def model_snapshots(session: Session, base_model: str) -> list[Snapshot]:
    """Every snapshot row of a base model, oldest first."""
    return list(session.execute(select(Snapshot).where(Snapshot.base_model == base_model)
                                .order_by(Snapshot.id)).scalars())


def snapshot_edit_ids(session: Session, snapshot_id: int) -> list[int]:
    """The edits one snapshot lists, ascending."""
    return sorted(session.execute(select(SnapshotEdit.edit_id).where(SnapshotEdit.snapshot_id == snapshot_id))
                  .scalars())


def edit_counts(session: Session, snapshot_ids: Sequence[int]) -> dict[int, int]:
    """How many edits each of `snapshot_ids` lists (absent: none)."""
    if not snapshot_ids:
        return {}
    rows = session.execute(select(SnapshotEdit.snapshot_id, func.count()).where(
        SnapshotEdit.snapshot_id.in_(list(snapshot_ids))).group_by(SnapshotEdit.snapshot_id))
    return {sid: n for sid, n in rows}


def carried_edits(session: Session, snapshot_id: int | None) -> set[int]:
    """Every edit id carried by the snapshots on the chain of `snapshot_id` (none for the base)."""
    ids = [s.id for s in snapshot_chain_in(session, snapshot_id)]
    if not ids:
        return set()
    return set(session.execute(select(SnapshotEdit.edit_id).where(SnapshotEdit.snapshot_id.in_(ids))).scalars())


def model_snapshot_paths(session: Session, base_model: str) -> list[str]:
    """Every path a snapshot row of this model names (files not listed are orphans)."""
    return list(session.execute(select(Snapshot.path).where(Snapshot.base_model == base_model)).scalars())


def chain_subjects(session: Session, chain_ids: Sequence[int]) -> list[str]:
    """The subjects of every edit the snapshots `chain_ids` carry (what a scoped head is about)."""
    if not chain_ids:
        return []
    rows = session.execute(select(Edit.subject).join(SnapshotEdit, SnapshotEdit.edit_id == Edit.id)
                           .where(SnapshotEdit.snapshot_id.in_(list(chain_ids))).distinct())
    return sorted(rows.scalars())
