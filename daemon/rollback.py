"""Rollback: move a model's head back to an earlier snapshot (or the base), never by subtracting weights.

Owns the rows a rollback changes, in one transaction under the applier lock: later snapshots become
`rolled_back`, the edits they carried become `rolled_back` (or, with `requeue`, go on to `pending`), the
head moves. The weights follow by definition: the model at a snapshot is base + its chain
(`daemon.materialise`), so the rolled-back model is bit-identical to the one the snapshot was published with.

    rollback(settings, store, 3)                 # `horse-ledger rollback 3`
    rollback(settings, store, None, requeue=True)  # `horse-ledger rollback base --requeue`
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any

from sqlalchemy import select

from daemon.errors import NotOnChain
from daemon.locks import applier_lock
from daemon.materialise import chain, head_id
from ledger.config import Settings
from ledger.errors import SnapshotNotFound
from ledger.events import record_event
from ledger.models import Edit, Snapshot, SnapshotEdit
from ledger.status import EditStatus, transition
from ledger.store import Store, set_head

log = logging.getLogger("daemon.rollback")


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


def carried_edits(session, snapshot_id: int | None) -> set[int]:
    """Every edit id carried by the snapshots on the chain of `snapshot_id`."""
    ids = [s.id for s in chain(session, snapshot_id)]
    if not ids:
        return set()
    return set(session.execute(select(SnapshotEdit.edit_id).where(SnapshotEdit.snapshot_id.in_(ids))).scalars())


def parse_snapshot_ref(ref: str) -> int | None:
    """"base" → None, "12" → 12 (raises ValueError otherwise)."""
    ref = ref.strip()
    if ref.lower() in ("base", "none", "0"):
        return None
    return int(ref)


def rollback(settings: Settings, store: Store, target: int | None, *, requeue: bool = False,
             actor: str = "cli") -> RollbackResult:
    """Move the head of `settings.model` back to `target` (None = the unedited base).

    Raises:
        SnapshotNotFound: no such snapshot.
        NotOnChain: the snapshot belongs to another model, is already rolled back, or is not older than the head.
        ApplierBusy: a batch is running.
    """
    base_model = settings.model
    with applier_lock(settings, base_model):
        with store.session() as s:
            current = head_id(s, base_model)
            if target is not None:
                snap = s.get(Snapshot, target)
                if snap is None:
                    raise SnapshotNotFound(f"no snapshot has id {target}; see `horse-ledger snapshots`")
                if snap.base_model != base_model:
                    raise NotOnChain(f"snapshot {target} belongs to {snap.base_model}, not {base_model}; "
                                     f"pass --config/--model for that model")
                if snap.status != "published":
                    raise NotOnChain(f"snapshot {target} is {snap.status}; roll back to a published snapshot "
                                     f"(see `horse-ledger snapshots`) or to `base`")
                if current is not None and target > current:
                    raise NotOnChain(f"snapshot {target} is newer than the head ({current}); rollback only moves back")
            result = RollbackResult(base_model=base_model, from_snapshot=current, to_snapshot=target)
            if target == current:
                log.info("head already at %s; nothing to roll back", target if target is not None else "base")
                return result
            keep_snapshots = {c.id for c in chain(s, target)}
            later = list(s.execute(select(Snapshot).where(
                Snapshot.base_model == base_model, Snapshot.status == "published",
                Snapshot.id > (target or 0)).order_by(Snapshot.id)).scalars())
            later = [x for x in later if x.id not in keep_snapshots]
            later_ids = [x.id for x in later]
            carried_later: set[int] = set()
            if later_ids:
                carried_later = set(s.execute(select(SnapshotEdit.edit_id)
                                              .where(SnapshotEdit.snapshot_id.in_(later_ids))).scalars())
            to_roll = carried_later | carried_edits(s, current)
            to_roll -= carried_edits(s, target)
            to_roll_applied = sorted(s.execute(select(Edit.id).where(
                Edit.id.in_(sorted(to_roll)), Edit.status == EditStatus.APPLIED.value)).scalars()) if to_roll else []
            reason = f"rollback of {base_model} to {'base' if target is None else f'snapshot {target}'}"
            for x in later:
                x.status = "rolled_back"
                record_event(s, "snapshot.rolled_back", actor=actor, snapshot_id=x.id, batch_id=x.batch_id,
                             reason=reason)
            transition(s, to_roll_applied, EditStatus.APPLIED, EditStatus.ROLLED_BACK, actor=actor, reason=reason)
            if requeue:
                transition(s, to_roll_applied, EditStatus.ROLLED_BACK, EditStatus.PENDING, actor=actor,
                           reason=f"requeued after {reason}", values={"claim_token": None})
            # an edit replaced by a rolled-back one is in force again where its own snapshot stays on the chain
            restored = sorted(s.execute(select(Edit.id).where(
                Edit.status == EditStatus.SUPERSEDED.value, Edit.superseded_by_id.in_(to_roll_applied),
                Edit.snapshot_id.in_(sorted(keep_snapshots)))).scalars()) if to_roll_applied and keep_snapshots else []
            transition(s, restored, EditStatus.SUPERSEDED, EditStatus.APPLIED, actor=actor,
                       reason=f"{reason}: the edit that replaced it was rolled back", values={"superseded_by_id": None})
            set_head(s, base_model, target, actor=actor, reason=reason)
            result.rolled_back_snapshots = later_ids
            result.rolled_back_edits = to_roll_applied
            result.requeued_edits = to_roll_applied if requeue else []
            result.restored_edits = restored
    log.info("rolled back", extra=result.to_dict())
    return result
