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
`Store.claim_batch` (`night_cap_clause`). Status changes go through `ledger.status.transition`.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, or_, select, text, update
from sqlalchemy.orm import Session

from ledger.errors import LedgerError
from ledger.events import record_event
from ledger.models import Edit, ProtectedFact, utcnow
from ledger.status import EditStatus, transition

if TYPE_CHECKING:
    from ledger.config import Settings
    from ledger.store import EditRecord, Store
    from ledger.validate import EditSpec

POLICY_PREFIX = "policy:"
DAY = timedelta(hours=24)


class SelfApproval(LedgerError):
    """The submitter of an edit cannot approve it; ask another reviewer to run `horse-ledger review approve`."""


class QuotaExceeded(LedgerError):
    """An identity sent more edits than the trust policy allows; wait, or ask an operator to raise the limit."""


class NotProposed(LedgerError):
    """Only proposed edits can be reviewed; see `horse-ledger show ID` for where the edit stands."""


# ------------------------------------------------------------------------------------------ identity

def current_identity(store: Store) -> str:
    """Who is acting, as the database sees it: `current_user` on PostgreSQL, else the effective OS user."""
    with store.session(write=False) as s:
        return session_identity(s)


def session_identity(session: Session) -> str:
    """current_identity, in an open session."""
    if session.get_bind().dialect.name == "postgresql":
        return str(session.execute(text("SELECT current_user")).scalar_one())
    return os_user()


def os_user() -> str:
    """The effective OS user's name (uid:<n> when it has no passwd entry)."""
    try:
        import pwd

        return pwd.getpwuid(os.geteuid()).pw_name
    except (ImportError, KeyError):
        return f"uid:{os.geteuid()}" if hasattr(os, "geteuid") else "unknown"


# ------------------------------------------------------------------------------------- trust policy

@dataclass(frozen=True)
class TrustPolicy:
    """What the `review_*` settings say: who and what is approved at submission, and the daily limit."""

    name: str = "trust-policy"
    identities: frozenset[str] = frozenset()
    sources: tuple[str, ...] = ()
    always_subjects: frozenset[str] = frozenset()  # casefolded
    protected_subjects: bool = True
    max_edits_per_day: int = 0

    @classmethod
    def from_settings(cls, settings: Settings) -> TrustPolicy:
        split = settings.split_list
        return cls(name=settings.review_policy_name, identities=frozenset(split(settings.review_auto_approve_identities)),
                   sources=split(settings.review_auto_approve_sources),
                   always_subjects=frozenset(s.casefold() for s in split(settings.review_always_subjects)),
                   protected_subjects=settings.review_protected_subjects,
                   max_edits_per_day=settings.review_max_edits_per_day)

    @property
    def reviewer(self) -> str:
        return POLICY_PREFIX + self.name

    def approving_rule(self, identity: str, spec: EditSpec, reserved: frozenset[str]) -> str | None:
        """Why the policy approves this edit at submission, or None when a person must review it.

        Args:
            reserved: casefolded subjects that always need a person (settings plus protected facts').
        """
        if any(name.casefold() in reserved for name in (spec.subject, *spec.aliases)):
            return None
        if identity in self.identities:
            return f"identity {identity} is in review_auto_approve_identities"
        source = spec.source or ""
        for entry in self.sources:
            if source == entry or (entry.endswith("*") and source.startswith(entry[:-1])):
                return f"source {source!r} matches {entry!r} in review_auto_approve_sources"
        return None


@dataclass(frozen=True)
class Intake:
    """How `Store.add_edits` takes new edits: from whom, whether they need review, under which policy."""

    identity: str
    review: bool = False
    policy: TrustPolicy = field(default_factory=TrustPolicy)

    @classmethod
    def from_settings(cls, settings: Settings, identity: str) -> Intake:
        return cls(identity=identity, review=settings.review_required, policy=TrustPolicy.from_settings(settings))


def intake_decider(session: Session, intake: Intake, now: datetime) -> Callable[[EditSpec], dict[str, Any]]:
    """A function giving each new edit's review columns (status, submitted_by, review, reviewed_by,
    reviewed_at) and, for a policy approval, `_rule` (why; for the event, not a column)."""
    reserved = intake.policy.always_subjects
    if intake.review and intake.policy.protected_subjects:
        subjects = session.execute(select(ProtectedFact.subject).where(ProtectedFact.subject.is_not(None))).scalars()
        reserved = reserved | frozenset(s.casefold() for s in subjects)

    def decide(spec: EditSpec) -> dict[str, Any]:
        base = {"submitted_by": intake.identity, "review": None, "reviewed_by": None, "reviewed_at": None}
        if not intake.review:
            return {**base, "status": EditStatus.PENDING.value}
        rule = intake.policy.approving_rule(intake.identity, spec, reserved)
        if rule is None:
            return {**base, "status": EditStatus.PROPOSED.value}
        return {**base, "status": EditStatus.PENDING.value, "review": "approved",
                "reviewed_by": intake.policy.reviewer, "reviewed_at": now, "_rule": rule}

    return decide


def check_daily_quota(session: Session, intake: Intake, n_new: int, now: datetime) -> None:
    """Refuse (before anything is written) when n_new more edits would take the identity past its limit.

    Raises:
        QuotaExceeded: naming the identity, the limit and when room frees up.
    """
    limit = intake.policy.max_edits_per_day
    if limit <= 0 or n_new == 0:
        return
    recent = session.execute(select(func.count(), func.min(Edit.submitted_at)).where(
        Edit.submitted_by == intake.identity, Edit.submitted_at >= now - DAY)).one()
    if recent[0] + n_new > limit:
        raise QuotaExceeded(f"{intake.identity} submitted {recent[0]} edits in the last 24 hours and the limit is "
                            f"{limit} (review_max_edits_per_day); these {n_new} were not written. Submit them "
                            "later, or ask an operator to raise the limit")


def record_policy_approvals(session: Session, intake: Intake, approved: dict[int, str], now: datetime) -> None:
    """One `review.approved` event per edit the policy approved at submission, by policy:<name>."""
    for edit_id, rule in approved.items():
        record_event(session, "review.approved", actor=intake.policy.reviewer, edit_id=edit_id, reason=rule,
                     payload={"submitted_by": intake.identity}, at=now)


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


# ------------------------------------------------------------------------------------------ claims

def night_cap_clause(cap: int) -> Any:
    """A WHERE clause for claim_batch: the edit is among the `cap` oldest pending edits of its submitter
    (edits with no recorded submitter, from before review existed, are not capped)."""
    rank = func.row_number().over(partition_by=Edit.submitted_by, order_by=Edit.id).label("rank")
    ranked = select(Edit.id, Edit.submitted_by, rank).where(Edit.status == EditStatus.PENDING.value).subquery()
    allowed = select(ranked.c.id).where(or_(ranked.c.submitted_by.is_(None), ranked.c.rank <= cap))
    return Edit.id.in_(allowed)


# ------------------------------------------------------------------------------------------ display

def review_state(edit: EditRecord) -> str:
    """One word or two for tables: awaiting review, approved by X, rejected by X, or - (not reviewed)."""
    if edit.status == EditStatus.PROPOSED.value:
        return "awaiting review"
    if edit.review:
        return f"{edit.review} by {edit.reviewed_by}"
    return "-"
