"""`horse-ledger review`: list the edits awaiting review, approve or reject them; and the small helpers with which
ledger/cli.py's add, list, show and status show review state.

    horse-ledger review list [--json]
    horse-ledger review approve 12 13 [--reason TEXT]      # not by the identity that submitted them
    horse-ledger review reject 14 --reason "the source says otherwise"

The reviewer is the identity of the process (ledger/review.py: the OS user on SQLite, `current_user` on
PostgreSQL); nothing on the command line can name another. Loaded lazily from LAZY_COMMANDS.
"""
from __future__ import annotations

from typing import Any

import click

from ledger.cliapp import AppContext, clip, echo_json, fmt_time, pass_app, table
from ledger.review import Intake, approve, current_identity, reject, review_state
from ledger.status import EditStatus


# ------------------------------------------------------------------------------- helpers for ledger/cli.py

def submission_intake(app: AppContext) -> Intake:
    """How `add` submits: as the current identity, with review and the trust policy from the settings."""
    return Intake.from_settings(app.settings, current_identity(app.store()))


def announce_review(results: list[Any]) -> None:
    """Tell the submitter (stderr) which new edits await review."""
    waiting = [r.id for r in results if r.created and r.status == EditStatus.PROPOSED.value]
    if waiting:
        ids = " ".join(map(str, waiting[:10])) + (" …" if len(waiting) > 10 else "")
        click.echo(f"{len(waiting)} edit{'s' * (len(waiting) != 1)} await{'s' * (len(waiting) == 1)} review "
                   f"(someone other than you runs `horse-ledger review approve {ids}`)", err=True)


def review_rows(edit: Any) -> list[tuple[str, Any]]:
    """`show`'s lines about review (none for an edit that was never reviewed and needs no review)."""
    state = review_state(edit)
    rows: list[tuple[str, Any]] = [("submitted_by", edit.submitted_by)]
    if state != "-":
        rows.append(("review", state + (f" at {fmt_time(edit.reviewed_at)}" if edit.reviewed_at else "")))
    return rows


def status_review_lines(app: AppContext, counts: dict[str, int]) -> dict[str, Any]:
    """`status`'s review summary: whether review is on and how many edits await it."""
    return {"required": app.settings.review_required, "awaiting": counts.get(EditStatus.PROPOSED.value, 0)}


# ---------------------------------------------------------------------------------------------- commands

@click.group()
def review() -> None:
    """Review proposed edits: list, approve, reject (never your own approval)."""


@review.command("list")
@click.option("--limit", type=click.IntRange(1), default=100, show_default=True, help="At most N edits, oldest first.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_app
def review_list(app: AppContext, limit: int, as_json: bool) -> None:
    """The edits awaiting review, oldest first."""
    edits = app.store().list_edits(status=EditStatus.PROPOSED.value, limit=limit, oldest_first=True)
    if as_json:
        echo_json([e.to_dict() for e in edits])
        return
    if not edits:
        click.echo("no edits await review", err=True)
        return
    table(["ID", "SUBMITTED", "BY", "SUBJECT", "PROMPT", "TARGET", "SOURCE"],
           [(e.id, fmt_time(e.submitted_at), clip(e.submitted_by, 16), clip(e.subject, 24),
             clip(e.rendered_prompt, 40), clip(e.target_new, 20), clip(e.source, 24)) for e in edits])


@review.command("approve")
@click.argument("edit_ids", metavar="ID…", type=click.IntRange(1), nargs=-1, required=True)
@click.option("--reason", help="Why (kept in the audit trail).")
@pass_app
def review_approve(app: AppContext, edit_ids: tuple[int, ...], reason: str | None) -> None:
    """Approve proposed edits (all or none): they become pending and the next night applies them."""
    store = app.store()
    ids = approve(store, edit_ids, identity=current_identity(store), reason=reason)
    click.echo(f"approved {len(ids)} edit{'s' * (len(ids) != 1)}: {' '.join(map(str, ids))}")


@review.command("reject")
@click.argument("edit_ids", metavar="ID…", type=click.IntRange(1), nargs=-1, required=True)
@click.option("--reason", required=True, help="Why (kept in the audit trail; required).")
@pass_app
def review_reject(app: AppContext, edit_ids: tuple[int, ...], reason: str) -> None:
    """Reject proposed edits (all or none), with a reason."""
    if not reason.strip():
        raise click.BadParameter("give a non-empty reason", param_hint="--reason")
    store = app.store()
    ids = reject(store, edit_ids, identity=current_identity(store), reason=reason.strip())
    click.echo(f"rejected {len(ids)} edit{'s' * (len(ids) != 1)}: {' '.join(map(str, ids))}")
