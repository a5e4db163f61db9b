"""Submitting edits: `Store.add_edits` (idempotent by content hash, supersedes an older pending edit of the same
subject and prompt, review columns from `ledger.trust`) and `Store.cancel`. A mixin of `ledger.store.Store`.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Callable

from sqlalchemy import func, select, text, update
from sqlalchemy.orm import Session

from ledger.db import StoreBase, chunks
from ledger.events import event_row
from ledger.models import Edit, Event, utcnow
from ledger.records import AddResult, EditRecord
from ledger.status import ACTIVE, EditStatus, transition
from ledger.trust import Intake, check_daily_quota, intake_decider, record_policy_approvals, session_identity
from ledger.validate import EditSpec

_PG_ADD_LOCK = 0x6C656467  # pg_advisory_xact_lock key that serialises add_edits (idempotency, supersede)


class Submitting(StoreBase):
    """`add_edits` and `cancel`."""

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
            for chunk in chunks(hashes):
                rows = s.execute(select(Edit.content_hash, Edit.id, Edit.status)
                                 .where(Edit.content_hash.in_(chunk), Edit.status.in_([a.value for a in ACTIVE]))
                                 .order_by(Edit.id))
                for h, i, st in rows:
                    by_hash.setdefault(h, (i, st))
            pending_by_key: dict[str, int] = {}
            for chunk in chunks(keys):
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


def _created_payload(spec: EditSpec, decision: dict[str, Any]) -> dict[str, Any] | None:
    """The `edit.created` event's payload: the source, and the status the edit starts in when review is on."""
    out = {"source": spec.source} if spec.source else {}
    if decision["status"] != EditStatus.PENDING.value or decision["review"]:
        out.update(status=decision["status"], review=decision["review"], reviewed_by=decision["reviewed_by"])
    return out or None
