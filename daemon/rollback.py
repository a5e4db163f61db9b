"""Rollback: move a model's head back to an earlier snapshot (or the base), never by subtracting weights.

Under the applier lock, `ledger.rollback.roll_back` changes the rows in one transaction: later snapshots become
`rolled_back`, the edits they carried become `rolled_back` (or, with `requeue`, go on to `pending`), the head
moves. The weights follow by definition: the model at a snapshot is base + its chain (`daemon.materialise`),
so the rolled-back model is bit-identical to the one the snapshot was published with.

    rollback(settings, store, 3)                 # `horse-ledger rollback 3`
    rollback(settings, store, None, requeue=True)  # `horse-ledger rollback base --requeue`
"""
from __future__ import annotations

import logging

from daemon.locks import applier_lock
from ledger.config import Settings
from ledger.rollback import RollbackResult, roll_back
from ledger.store import Store

log = logging.getLogger("daemon.rollback")


def rollback(settings: Settings, store: Store, target: int | None, *, requeue: bool = False,
             actor: str = "cli") -> RollbackResult:
    """Move the head of `settings.model` back to `target` (None = the unedited base).

    Raises:
        SnapshotNotFound: no such snapshot.
        NotOnChain: the snapshot belongs to another model, is already rolled back, or is not older than the head.
        ApplierBusy: a batch is running.
    """
    with applier_lock(settings, settings.model):
        with store.session() as s:
            result = roll_back(s, settings.model, target, requeue=requeue, actor=actor)
    if result.from_snapshot == result.to_snapshot:
        log.info("head already at %s; nothing to roll back", target if target is not None else "base")
    else:
        log.info("rolled back", extra=result.to_dict())
    return result
