"""The daemon's side of the Store: claim a batch of pending edits, heartbeat the claim, release it, sweep stale
claims, retry failed edits. A mixin of `ledger.store.Store`. Edit status moves go through
`ledger.status.transition`, batch status moves through `ledger.batch_status.move_batch`.
"""
from __future__ import annotations

import secrets
from datetime import timedelta
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from ledger.batch_status import OPEN, BatchStatus, move_batch
from ledger.db import StoreBase
from ledger.errors import BatchNotFound
from ledger.events import record_event
from ledger.models import Batch, Edit, utcnow
from ledger.records import EDIT_FIELDS, ClaimedBatch, EditRecord
from ledger.status import EditStatus, transition
from ledger.trust import night_cap_clause


class Claims(StoreBase):
    """claim_batch, heartbeat, release_batch, sweep_stale, retry_failed, update_batch."""

    def claim_batch(self, n: int, *, base_model: str, actor: str = "daemon") -> ClaimedBatch | None:
        """Atomically claim up to n oldest pending edits into a new batch (status claimed).

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
            batch = Batch(token=token, base_model=base_model, status=BatchStatus.CLAIMED.value, actor=actor, n_edits=len(ids),
                          started_at=now, metrics={})
            s.add(batch)
            s.flush()
            transition(s, ids, EditStatus.PENDING, EditStatus.CLAIMED, actor=actor, batch_id=batch.id,
                       values={"claim_token": token, "claimed_at": now, "heartbeat_at": now,
                               "attempts": Edit.attempts + 1})
            record_event(s, "batch.claimed", actor=actor, batch_id=batch.id,
                         payload={"n_edits": len(ids), "base_model": base_model}, at=now)
            cols = [Edit.__table__.c[name] for name in EDIT_FIELDS]
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
            move_batch(s, batch.id, BatchStatus(batch_status), actor=actor, reason=reason, payload={"released": ids})
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
                batch = s.get(Batch, batch_id) if still == 0 else None
                if batch is not None and batch.status in OPEN:
                    move_batch(s, batch_id, BatchStatus.ABANDONED, actor=actor, reason="claim went stale")
            return ids

    def retry_failed(self, max_attempts: int, *, actor: str) -> list[int]:
        """failed → pending for every failed edit tried fewer than max_attempts times; returns the ids."""
        with self.session() as s:
            ids = list(s.execute(self._lock(select(Edit.id).where(
                Edit.status == EditStatus.FAILED.value, Edit.attempts < max_attempts))).scalars())
            transition(s, ids, EditStatus.FAILED, EditStatus.PENDING, actor=actor,
                       reason=f"retry (fewer than {max_attempts} attempts)", values={"claim_token": None})
            return ids

    def _claimed_ids(self, s: Session, cond: Any) -> list[int]:
        q = select(Edit.id).where(Edit.status == EditStatus.CLAIMED.value, cond).order_by(Edit.id)
        return list(s.execute(self._lock(q)).scalars())

    def update_batch(self, batch_id: int, *, actor: str, event_kind: str | None = None, **values: Any) -> None:
        """Set batch columns (finished_at, metrics, error, n_edits). A `status` moves the batch through
        `move_batch` (along BATCH_MOVES, with its `batch.<status>` event); else `event_kind`, when given, is recorded."""
        with self.session() as s:
            batch = s.get(Batch, batch_id)
            if batch is None:
                raise BatchNotFound(f"no batch has id {batch_id}")
            status = values.pop("status", None)
            for k, v in values.items():
                setattr(batch, k, v)
            if status is not None:
                move_batch(s, batch_id, BatchStatus(status), actor=actor, reason=values.get("error"))
            elif event_kind:
                record_event(s, event_kind, actor=actor, batch_id=batch_id, reason=values.get("error"))
