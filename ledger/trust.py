"""The trust policy: who is submitting (`session_identity`), which new edits need a person's review and which the
policy approves at submission (`Intake`, `TrustPolicy`), how many edits one identity may send in 24 hours
(`check_daily_quota`, inside `Store.add_edits`' transaction) and per night (`night_cap_clause`, applied by
`Store.claim_batch`). The decisions on proposed edits (approve, reject) are `ledger.review`'s.

Identities cannot be typed in: the effective OS user of the process on SQLite, the database role
(`current_user`) on PostgreSQL. An edit the policy approves is recorded as approved by `policy:<name>`, unless
its subject (or an alias) always needs a person.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, or_, select, text
from sqlalchemy.orm import Session

from ledger.errors import LedgerError
from ledger.events import record_event
from ledger.models import Edit, ProtectedFact
from ledger.status import EditStatus

if TYPE_CHECKING:
    from ledger.config import Settings
    from ledger.validate import EditSpec

POLICY_PREFIX = "policy:"
DAY = timedelta(hours=24)


class QuotaExceeded(LedgerError):
    """An identity sent more edits than the trust policy allows; wait, or ask an operator to raise the limit."""


# ------------------------------------------------------------------------------------------ identity

def session_identity(session: Session) -> str:
    """Who is acting, as the database sees it: `current_user` on PostgreSQL, else the effective OS user
    (`ledger.review.current_identity` outside a session)."""
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


# ------------------------------------------------------------------------------------------ claims

def night_cap_clause(cap: int) -> Any:
    """A WHERE clause for claim_batch: the edit is among the `cap` oldest pending edits of its submitter
    (edits with no recorded submitter, from before review existed, are not capped)."""
    rank = func.row_number().over(partition_by=Edit.submitted_by, order_by=Edit.id).label("rank")
    ranked = select(Edit.id, Edit.submitted_by, rank).where(Edit.status == EditStatus.PENDING.value).subquery()
    allowed = select(ranked.c.id).where(or_(ranked.c.submitted_by.is_(None), ranked.c.rank <= cap))
    return Edit.id.in_(allowed)
