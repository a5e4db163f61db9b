"""The rows a rollback changes, in one transaction: later snapshots become `rolled_back`, the edits they carried
become `rolled_back` (or, with `requeue`, go on to `pending`), edits they had superseded are applied again, the
head moves. The daemon (`daemon.rollback`) holds the applier lock around it; the weights follow by definition
(the model at a snapshot is base + its chain), so nothing here touches a file.

    with store.session() as s:
        result = roll_back(s, "smollm2-135m", 3, requeue=False, actor="cli")
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from ledger.errors import IllegalTransition, NotOnChain, SnapshotNotFound
from ledger.events import record_event
from ledger.models import Edit, Snapshot, SnapshotEdit
from ledger.snapshot_reads import carried_edits, head_id
from ledger.status import SNAPSHOT_MOVES, EditStatus, SnapshotStatus, transition
from ledger.store import set_head, snapshot_chain_in


@dataclass
class RollbackResult:
    base_model: str
    from_snapshot: int | None
    to_snapshot: int | None
    rolled_back_snapshots: list[int] = field(default_factory=list)
    rolled_back_edits: list[int] = field(default_factory=list)
    requeued_edits: list[int] = field(default_factory=list)
    restored_edits: list[int] = field(default_factory=list)  # superseded → applied: their replacement was rolled back

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def move_snapshots(session: Session, snaps: Sequence[Snapshot], dst: SnapshotStatus, *, actor: str,
                   reason: str) -> None:
    """The one place a snapshot's status changes, with a `snapshot.<status>` event each."""
    for snap in snaps:
        if (SnapshotStatus(snap.status), dst) not in SNAPSHOT_MOVES:
            raise IllegalTransition(f"snapshot {snap.id} is {snap.status} and cannot become {dst}")
        snap.status = dst.value
        record_event(session, f"snapshot.{dst.value}", actor=actor, snapshot_id=snap.id, batch_id=snap.batch_id,
                     reason=reason)


def _check_target(session: Session, base_model: str, target: int | None, current: int | None) -> None:
    if target is None:
        return
    snap = session.get(Snapshot, target)
    if snap is None:
        raise SnapshotNotFound(f"no snapshot has id {target}; see `horse-ledger snapshots`")
    if snap.base_model != base_model:
        raise NotOnChain(f"snapshot {target} belongs to {snap.base_model}, not {base_model}; "
                         f"pass --config/--model for that model")
    if snap.status != SnapshotStatus.PUBLISHED:
        raise NotOnChain(f"snapshot {target} is {snap.status}; roll back to a published snapshot "
                         f"(see `horse-ledger snapshots`) or to `base`")
    if current is not None and target > current:
        raise NotOnChain(f"snapshot {target} is newer than the head ({current}); rollback only moves back")


def roll_back(session: Session, base_model: str, target: int | None, *, requeue: bool, actor: str
              ) -> RollbackResult:
    """Move the head of `base_model` back to `target` (None = the unedited base) in the caller's transaction.

    Raises:
        SnapshotNotFound: no such snapshot.
        NotOnChain: the snapshot belongs to another model, is already rolled back, or is not older than the head.
    """
    current = head_id(session, base_model)
    _check_target(session, base_model, target, current)
    result = RollbackResult(base_model=base_model, from_snapshot=current, to_snapshot=target)
    if target == current:
        return result
    keep_snapshots = {c.id for c in snapshot_chain_in(session, target)}
    later = [x for x in session.execute(select(Snapshot).where(
        Snapshot.base_model == base_model, Snapshot.status == SnapshotStatus.PUBLISHED.value,
        Snapshot.id > (target or 0)).order_by(Snapshot.id)).scalars() if x.id not in keep_snapshots]
    later_ids = [x.id for x in later]
    carried_later = set(session.execute(select(SnapshotEdit.edit_id).where(
        SnapshotEdit.snapshot_id.in_(later_ids))).scalars()) if later_ids else set()
    to_roll = (carried_later | carried_edits(session, current)) - carried_edits(session, target)
    rolled = sorted(session.execute(select(Edit.id).where(
        Edit.id.in_(sorted(to_roll)), Edit.status == EditStatus.APPLIED.value)).scalars()) if to_roll else []
    reason = f"rollback of {base_model} to {'base' if target is None else f'snapshot {target}'}"
    move_snapshots(session, later, SnapshotStatus.ROLLED_BACK, actor=actor, reason=reason)
    transition(session, rolled, EditStatus.APPLIED, EditStatus.ROLLED_BACK, actor=actor, reason=reason)
    if requeue:
        transition(session, rolled, EditStatus.ROLLED_BACK, EditStatus.PENDING, actor=actor,
                   reason=f"requeued after {reason}", values={"claim_token": None})
    # an edit replaced by a rolled-back one is in force again where its own snapshot stays on the chain
    restored = sorted(session.execute(select(Edit.id).where(
        Edit.status == EditStatus.SUPERSEDED.value, Edit.superseded_by_id.in_(rolled),
        Edit.snapshot_id.in_(sorted(keep_snapshots)))).scalars()) if rolled and keep_snapshots else []
    transition(session, restored, EditStatus.SUPERSEDED, EditStatus.APPLIED, actor=actor,
               reason=f"{reason}: the edit that replaced it was rolled back", values={"superseded_by_id": None})
    set_head(session, base_model, target, actor=actor, reason=reason)
    result.rolled_back_snapshots, result.rolled_back_edits = later_ids, rolled
    result.requeued_edits, result.restored_edits = (rolled if requeue else []), restored
    return result
