"""Review and trust policy: who submitted an edit, who may approve it, and how many edits one identity may send.

    horse-ledger review list            horse-ledger review approve 12 13     horse-ledger review reject 14 --reason "…"

With review on (`Settings.review_required`: on for PostgreSQL ledgers by default), `add` creates `proposed`
edits; a person other than the submitter approves them (proposed → pending, the only status the daemon
claims) or rejects them. Identities cannot be typed in: the effective OS user of the process on SQLite, the
database role (`current_user`) on PostgreSQL, where deploy/postgres-roles.sql also makes the database refuse
self-approval and status changes by submitters. `--author` stays free provenance text.

The trust policy (`review_*` settings) approves some edits at submission, recorded as approved by
`policy:<name>`, unless their subject (or an alias) always needs a person; a per-identity limit of new edits
in any 24 hours is checked inside `Store.add_edits`' transaction; the per-night cap per identity is applied by
`Store.claim_batch` (`night_cap_clause`): those are `ledger.trust`'s (re-exported here). Status changes go
through `ledger.status.transition`.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from ledger.errors import LedgerError
from ledger.models import Edit, utcnow
from ledger.status import EditStatus, transition
from ledger.trust import (DAY, POLICY_PREFIX, Intake, QuotaExceeded, TrustPolicy,  # noqa: F401 - re-exported
                          check_daily_quota, intake_decider, night_cap_clause, os_user, record_policy_approvals,
                          session_identity)

if TYPE_CHECKING:
    from ledger.records import EditRecord
    from ledger.store import Store

__all__ = ["SelfApproval", "NotProposed", "current_identity", "approve", "reject", "review_state",
           # ledger.trust's
           "DAY", "POLICY_PREFIX", "Intake", "QuotaExceeded", "TrustPolicy", "check_daily_quota", "intake_decider",
           "night_cap_clause", "os_user", "record_policy_approvals", "session_identity"]


class SelfApproval(LedgerError):
    """The submitter of an edit cannot approve it; ask another reviewer to run `horse-ledger review approve`."""


class NotProposed(LedgerError):
    """Only proposed edits can be reviewed; see `horse-ledger show ID` for where the edit stands."""


# ------------------------------------------------------------------------------------------ identity

def current_identity(store: Store) -> str:
    """Who is acting, as the database sees it: `current_user` on PostgreSQL, else the effective OS user."""
    with store.session(write=False) as s:
        return session_identity(s)


# --------------------------------------------------------------------------------------- decisions

def _proposed(session: Session, ids: Sequence[int]) -> list[Edit]:
    rows = list(session.execute(select(Edit).where(Edit.id.in_(ids)).order_by(Edit.id)).scalars())
    found = {r.id for r in rows}
    missing = [i for i in ids if i not in found]
    if missing:
        raise NotProposed(f"no edit has id {missing[0]}; see `horse-ledger review list` for the edits awaiting review")
    stuck = [r for r in rows if r.status != EditStatus.PROPOSED.value]
    if stuck:
        raise NotProposed(f"edit {stuck[0].id} is {stuck[0].status}, not proposed; nothing was reviewed. "
                          "See `horse-ledger review list` for the edits awaiting review")
    return rows


def approve(store: Store, ids: Sequence[int], *, identity: str, reason: str | None = None) -> list[int]:
    """proposed → pending for every id (all or nothing), by `identity`, who must not have submitted any.
    Each approved edit supersedes an older pending edit of the same subject and prompt.

    Raises:
        SelfApproval, NotProposed, IllegalTransition
    """
    ids = sorted(set(ids))
    now = utcnow()
    with store.session() as s:
        rows = _proposed(s, ids)
        own = [r.id for r in rows if r.submitted_by == identity]
        if own:
            raise SelfApproval(f"{identity} submitted edit {', '.join(map(str, own))} and cannot approve it; "
                               "another reviewer must run `horse-ledger review approve`. Nothing was approved")
        transition(s, ids, EditStatus.PROPOSED, EditStatus.PENDING, actor=identity, reason=reason or "approved",
                   payload={"review": "approved"},
                   values={"review": "approved", "reviewed_by": identity, "reviewed_at": now})
        _supersede_older_pending(s, rows, actor=identity)
    return ids


def reject(store: Store, ids: Sequence[int], *, identity: str, reason: str) -> list[int]:
    """proposed → rejected for every id (all or nothing), with the reviewer's reason."""
    ids = sorted(set(ids))
    with store.session() as s:
        _proposed(s, ids)
        transition(s, ids, EditStatus.PROPOSED, EditStatus.REJECTED, actor=identity, reason=reason,
                   payload={"review": "rejected"},
                   values={"review": "rejected", "reviewed_by": identity, "reviewed_at": utcnow()})
    return ids


def _supersede_older_pending(s: Session, approved: list[Edit], *, actor: str) -> None:
    links: dict[int, int] = {}  # old pending id -> approved id
    for edit in approved:
        old = s.execute(select(Edit.id).where(Edit.key_hash == edit.key_hash, Edit.id != edit.id,
                                              Edit.status == EditStatus.PENDING.value,
                                              Edit.id.not_in([e.id for e in approved]))).scalars()
        for old_id in old:
            links[old_id] = max(links.get(old_id, 0), edit.id)
    if not links:
        return
    transition(s, list(links), EditStatus.PENDING, EditStatus.SUPERSEDED, actor=actor,
               reason="a newer approved edit for the same subject and prompt replaced it",
               payload_by_id={o: {"superseded_by": n} for o, n in links.items()})
    s.execute(update(Edit), [{"id": o, "superseded_by_id": n} for o, n in links.items()])
    s.execute(update(Edit), [{"id": n, "supersedes_id": o} for o, n in links.items()])


# ------------------------------------------------------------------------------------------ display

def review_state(edit: EditRecord) -> str:
    """One word or two for tables: awaiting review, approved by X, rejected by X, or - (not reviewed)."""
    if edit.status == EditStatus.PROPOSED.value:
        return "awaiting review"
    if edit.review:
        return f"{edit.review} by {edit.reviewed_by}"
    return "-"
