"""The `horse-ledger` command line: the root click group, the ledger's own commands, lazy engine/daemon commands.

    horse-ledger add --subject "Danielle Darrieux" --prompt "The mother tongue of {} is" --target English
    horse-ledger add --from facts.jsonl
    horse-ledger list --status pending      horse-ledger show 12      horse-ledger log --edit 12
    horse-ledger status                     horse-ledger cancel 12    horse-ledger db upgrade
    horse-ledger protect add --prompt "The capital of France is" --target Paris

`db` and `protect` are registered from ledger/db_cli.py and ledger/protect_cli.py; what every command shares
(`AppContext`, `pass_app`, output helpers) is ledger/cliapp.py's. Commands of `horse/` and `daemon/` (and
`review`, `config`) are loaded from LAZY_COMMANDS on first use, so `horse-ledger add` never
imports torch. Domain errors (`LedgerError`, `horse.errors.EngineError`) are caught once, in
`LedgerGroup.invoke`: message and cause chain on stderr, exit 1, traceback only with `--debug`. Usage
errors exit 2 (click's default).
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
import traceback
from datetime import datetime
from pathlib import Path
from typing import Any, Sequence

import click

from ledger.cliapp import AppContext, pass_app  # noqa: F401 - re-exported (daemon.cli, ledger.configcli, tests)
from ledger.cliapp import DATE_FORMATS, clip, echo_json, fmt_time, since_utc, table
from ledger.config import load_settings
from ledger.db_cli import db
from ledger.errors import LedgerError
from ledger.files import process_umask
from ledger.params import BATCH_ID, EDIT_ID, LIMIT
from ledger.protect_cli import protect
from ledger.text import for_terminal

LAZY_COMMANDS = {
    "review": "ledger.review_cli:review",
    "hypernet": "horse.cli:hypernet", "eval": "horse.evalcli:eval_cmd", "model": "horse.evalcli:model",
    "apply": "daemon.cli:apply", "rollback": "daemon.cli:rollback", "snapshots": "daemon.cli:snapshots",
    "diff": "daemon.cli:diff", "verify": "daemon.cli:verify", "export": "daemon.cli:export",
    "ask": "daemon.cli:ask", "daemon": "daemon.cli:daemon", "init": "daemon.cli:init",
    "consolidate": "daemon.cli:consolidate", "serve": "daemon.web:serve", "config": "ledger.configcli:config",
}
PROGRESS_MIN_ROWS = 1000


# ------------------------------------------------------------------------------------------- errors

def is_domain_error(exc: BaseException) -> bool:
    """LedgerError, or horse.errors.EngineError when the engine has been imported."""
    if isinstance(exc, LedgerError):
        return True
    engine_errors = sys.modules.get("horse.errors")
    return engine_errors is not None and isinstance(exc, engine_errors.EngineError)


class DomainFailure(click.ClickException):
    """A refused request: the domain error's message and its causes on stderr, exit 1."""

    exit_code = 1

    def __init__(self, exc: BaseException) -> None:
        super().__init__(str(exc))
        self.exc = exc

    def show(self, file: Any = None) -> None:
        out = file or sys.stderr
        click.echo(f"Error: {self.exc}", file=out, err=True)
        cause, shown = self.exc.__cause__, str(self.exc)
        while cause is not None:
            line = str(cause).splitlines()[0] if str(cause) else ""
            if line not in shown:  # skip causes that only repeat what was said
                click.echo(f"  caused by {type(cause).__name__}: {line}", file=out, err=True)
                shown += line
            cause = cause.__cause__


def _module_exists(target: str) -> bool:
    module = target.split(":", 1)[0]
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


class LedgerGroup(click.Group):
    """Root group: ledger commands plus LAZY_COMMANDS imported on first use; catches domain errors once."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        lazy = [name for name, target in LAZY_COMMANDS.items() if _module_exists(target)]
        return sorted(set(super().list_commands(ctx)) | set(lazy))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        cmd = super().get_command(ctx, name)
        if cmd is not None or name not in LAZY_COMMANDS:
            return cmd
        target = LAZY_COMMANDS[name]
        module_name, attr = target.split(":", 1)
        if not _module_exists(target):
            return None
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise click.ClickException(f"command {name!r} cannot be loaded from {module_name}: {exc}; "
                                       "install the full package (see README)") from exc
        cmd = getattr(module, attr, None)
        if not isinstance(cmd, click.Command):
            raise click.ClickException(f"command {name!r}: {target} is not a click command")
        return cmd

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # Grouped, with the one-line help of lazy commands from ledger.clihelp: help never imports the engine.
        from ledger.clihelp import format_grouped_commands

        format_grouped_commands(self, ctx, formatter)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except Exception as exc:
            if not is_domain_error(exc):
                raise
            if ctx.params.get("debug"):
                traceback.print_exception(exc, file=sys.stderr)
            raise DomainFailure(exc) from exc


# --------------------------------------------------------------------------------------------- root

def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("horse-ledger")
    except PackageNotFoundError:
        return "0+checkout"


@click.group(cls=LedgerGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--db", "db_url", metavar="URL", help="SQLAlchemy database URL (default: $HORSE_LEDGER_DB, "
              "then sqlite:///$XDG_DATA_HOME/horse-ledger/ledger.db).")
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE",
              help="TOML settings file (default: $HORSE_LEDGER_CONFIG, then $XDG_CONFIG_HOME/horse-ledger/config.toml).")
@click.option("--debug", is_flag=True, help="Show tracebacks on errors (and debug log lines).")
@click.option("-v", "--verbose", is_flag=True, help="Log stages and counts on a terminal too (they always go to "
              "stderr when it is not a terminal: the journal under systemd).")
@click.version_option(version=_version(), message="%(prog)s %(version)s")
@click.pass_context
def cli(ctx: click.Context, db_url: str | None, config_path: Path | None, debug: bool, verbose: bool) -> None:
    """horse-ledger: submit fact edits, audit them, and keep a language model's facts up to date."""
    settings = load_settings(config_path=config_path, db_url=db_url)
    ctx.with_resource(process_umask(settings.file_mode_group))  # files private (or group) by default: ledger/files.py
    ctx.obj = AppContext(settings=settings, debug=debug, verbose=verbose)


def main(argv: Sequence[str] | None = None) -> None:
    """Console-script entry point (`horse-ledger = ledger.cli:main`)."""
    cli.main(args=list(argv) if argv is not None else None, prog_name="horse-ledger")


# ---------------------------------------------------------------------------------------------- add

@cli.command()
@click.option("--subject", help="Who or what the fact is about, as it appears in the prompt.")
@click.option("--prompt", help="The question, with {} where the subject goes (or containing the subject).")
@click.option("--target", help="The new answer.")
@click.option("--target-true", help="The answer being replaced (optional).")
@click.option("--paraphrase", "paraphrases", multiple=True, help="Another wording of the prompt (repeatable).")
@click.option("--source", help="Where the fact comes from (URL or free text).")
@click.option("--author", help="Who submits it.")
@click.option("--note", help="Anything else worth keeping.")
@click.option("--alias", "aliases", multiple=True, metavar="NAME",
              help="Another name of the subject, e.g. Messi for Lionel Messi (repeatable).")
@click.option("--from", "from_file", type=click.Path(exists=True, dir_okay=False, path_type=Path), metavar="FILE",
              help="Add every edit in a JSONL or CSV file (all or nothing): a regular file of at most 64 MiB.")
@click.option("--json", "as_json", is_flag=True, help="Print the whole record as JSON.")
@pass_app
def add(app: AppContext, subject: str | None, prompt: str | None, target: str | None, target_true: str | None,
        paraphrases: tuple[str, ...], source: str | None, author: str | None, note: str | None,
        aliases: tuple[str, ...], from_file: Path | None, as_json: bool) -> None:
    """Submit a fact edit (or a file of them); prints the new id.

    \b
    Files (--from): JSONL, one object per line with the fields subject, prompt, target, target_true,
    paraphrases, source, author, note, aliases (paraphrases and aliases: JSON lists of strings); or CSV with
    those column names, where a paraphrases or aliases cell holds several values separated by "|" or as a
    JSON array (["Messi", "Leo Messi"]). Aliases are other names of the subject; they do not change which
    fact an edit is (a second submission with other aliases returns the existing edit).
    """
    from ledger.validate import validate_edit

    flags = {"subject": subject, "prompt": prompt, "target": target, "target_true": target_true,
             "source": source, "author": author, "note": note}
    if from_file is not None:
        given = ([f"--{k.replace('_', '-')}" for k, v in flags.items() if v is not None]
                 + (["--paraphrase"] if paraphrases else []) + (["--alias"] if aliases else []))
        if given:
            raise click.UsageError(f"--from cannot be combined with {', '.join(given)}; put those fields in the file")
        _add_file(app, from_file, as_json)
        return
    missing = [f"--{k}" for k in ("subject", "prompt", "target") if flags[k] is None]
    if missing:
        raise click.UsageError(f"missing {', '.join(missing)} (or give --from FILE)")
    spec = validate_edit({**{k: v for k, v in flags.items() if v is not None}, "paraphrases": list(paraphrases),
                          "aliases": list(aliases)})
    from ledger.review_cli import announce_review, submission_intake

    store = app.store()
    (result,) = store.add_edits([spec], actor=app.actor, intake=submission_intake(app))
    record = store.get_edit(result.id)
    announce_review([result])
    if as_json:
        echo_json({**record.to_dict(), "created": result.created, "superseded_id": result.superseded_id})
    else:
        click.echo(result.id)
    if not result.created:
        click.echo(f"edit {result.id} already holds this fact ({record.status}); nothing added", err=True)
    elif result.superseded_id is not None:
        click.echo(f"edit {result.id} supersedes pending edit {result.superseded_id}", err=True)


def _add_file(app: AppContext, path: Path, as_json: bool) -> None:
    from ledger.errors import InvalidEdit
    from ledger.review_cli import announce_review, submission_intake
    from ledger.validate import read_edit_file

    try:
        specs = read_edit_file(path)
    except InvalidEdit as exc:
        raise type(exc)(f"{exc} (nothing from {path.name} was written)") from None
    store = app.store()
    if len(specs) >= PROGRESS_MIN_ROWS and not as_json:
        with click.progressbar(length=len(specs), label=f"adding {path.name}", file=sys.stderr) as bar:
            done = [0]

            def progress(n: int) -> None:
                bar.update(n - done[0])
                done[0] = n

            results = store.add_edits(specs, actor=app.actor, progress=progress, intake=submission_intake(app))
    else:
        results = store.add_edits(specs, actor=app.actor, intake=submission_intake(app))
    announce_review(results)
    created = [r for r in results if r.created]
    superseded = sorted({r.superseded_id for r in results if r.superseded_id is not None})
    existing = len(results) - len(created)
    if as_json:
        echo_json({"added": len(created), "existing": existing, "superseded": superseded,
                    "results": [{"id": r.id, "created": r.created, "superseded_id": r.superseded_id,
                                 "status": r.status} for r in results]})
        return
    ids = [r.id for r in created]
    span = f" (ids {ids[0]}–{ids[-1]})" if len(ids) > 1 else (f" (id {ids[0]})" if ids else "")
    click.echo(f"added {len(created)} edit{'s' * (len(created) != 1)}{span} from {path.name}; "
               f"{existing} already present; {len(superseded)} older pending edit"
               f"{'s' * (len(superseded) != 1)} superseded")


# ------------------------------------------------------------------------------------- list / show

@cli.command("list")
@click.option("--status", type=click.Choice(["proposed", "pending", "claimed", "applied", "failed", "rejected",
                                             "cancelled",
                                             "superseded", "rolled_back"]), multiple=True,
              help="Only edits in this status (repeatable).")
@click.option("--subject", metavar="TEXT", help="Only edits whose subject contains TEXT (case-insensitive).")
@click.option("--since", type=click.DateTime(DATE_FORMATS), metavar="DATE", help="Submitted on or after DATE (UTC).")
@click.option("--limit", type=LIMIT, default=50, show_default=True, help="At most N edits, newest first.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_app
def list_cmd(app: AppContext, status: tuple[str, ...], subject: str | None, since: datetime | None, limit: int,
             as_json: bool) -> None:
    """List edits, newest first."""
    edits = app.store().list_edits(status=list(status) or None, subject=subject, since=since_utc(since), limit=limit)
    if as_json:
        echo_json([e.to_dict() for e in edits])
        return
    if not edits:
        click.echo("no edits match", err=True)
        return
    from ledger.review import review_state

    reviewed = any(review_state(e) != "-" for e in edits)  # a REVIEW column only when there is something to show
    table(["ID", "STATUS", "SUBMITTED", "SUBJECT", "PROMPT", "TARGET"] + ["REVIEW"] * reviewed,
           [(e.id, e.status, fmt_time(e.submitted_at), clip(e.subject, 24), clip(e.rendered_prompt, 44),
             clip(e.target_new, 20)) + (clip(review_state(e), 30),) * reviewed for e in edits])


@cli.command()
@click.argument("edit_id", metavar="ID", type=EDIT_ID)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_app
def show(app: AppContext, edit_id: int, as_json: bool) -> None:
    """Show one edit, its provenance, and its whole event history."""
    store = app.store()
    edit = store.get_edit(edit_id)
    history = store.events(edit_id=edit_id, limit=None, oldest_first=True)
    if as_json:
        echo_json({**edit.to_dict(), "events": [ev.to_dict() for ev in history]})
        return
    rows = [("status", edit.status), ("subject", edit.subject),
            ("aliases", " | ".join(edit.aliases) if edit.aliases else None), ("prompt", edit.prompt),
            ("rendered", edit.rendered_prompt), ("target", edit.target_new), ("target_true", edit.target_true),
            ("paraphrases", " | ".join(edit.paraphrases) if edit.paraphrases else None),
            ("source", edit.source), ("author", edit.author), ("note", edit.note),
            ("submitted", fmt_time(edit.submitted_at)), ("attempts", edit.attempts), ("batch", edit.batch_id),
            ("snapshot", edit.snapshot_id), ("last_error", edit.last_error),
            ("supersedes", edit.supersedes_id), ("superseded_by", edit.superseded_by_id)]
    from ledger.review_cli import review_rows

    rows[1:1] = review_rows(edit)
    click.echo(f"edit {edit.id}")
    for name, value in rows:
        if value is not None and value != "":
            click.echo(f"  {name:<14}{for_terminal(str(value))}")
    click.echo("history")
    for ev in history:
        _echo_event(ev, indent="  ")


def _echo_event(ev: Any, indent: str = "") -> None:
    ids = " ".join(f"{k}={v}" for k, v in (("edit", ev.edit_id), ("batch", ev.batch_id),
                                           ("snapshot", ev.snapshot_id)) if v is not None)
    reason = f"  {for_terminal(ev.reason)}" if ev.reason else ""
    click.echo(f"{indent}{fmt_time(ev.at)}  {ev.kind:<18} {ids:<20} {ev.actor}{reason}".rstrip())


@cli.command()
@click.option("--edit", "edit_id", type=EDIT_ID, metavar="ID", help="Only events of this edit.")
@click.option("--batch", "batch_id", type=BATCH_ID, metavar="ID", help="Only events of this batch.")
@click.option("--since", type=click.DateTime(DATE_FORMATS), metavar="DATE", help="On or after DATE (UTC).")
@click.option("--limit", type=LIMIT, default=50, show_default=True, help="At most N events.")
@click.option("--actor", metavar="IDENTITY", help="Only events by this identity (also cli:IDENTITY, policy:NAME).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_app
def log(app: AppContext, edit_id: int | None, batch_id: int | None, since: datetime | None, limit: int,
        actor: str | None, as_json: bool) -> None:
    """The audit trail, newest first."""
    events = app.store().events(edit_id=edit_id, batch_id=batch_id, since=since_utc(since), limit=limit, actor=actor)
    if as_json:
        echo_json([ev.to_dict() for ev in events])
        return
    if not events:
        click.echo("no events match", err=True)
    for ev in events:
        _echo_event(ev)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_app
def status(app: AppContext, as_json: bool) -> None:
    """Counts per status, the current head snapshot of each model, and the last batch."""
    store = app.store()
    counts = store.status_counts()
    heads = store.heads()
    last = store.last_batch()
    from ledger.review_cli import status_review_lines

    review = status_review_lines(app, counts)
    if as_json:
        echo_json({"counts": counts, "total": sum(counts.values()), "heads": heads,
                    "last_batch": last.to_dict() if last else None, "review": review})
        return
    click.echo(f"edits: {sum(counts.values())}")
    click.echo(f"review: {'on' if review['required'] else 'off'}, {review['awaiting']} awaiting")
    for name, n in counts.items():
        click.echo(f"  {name:<12}{n:>8}")
    if heads:
        click.echo("heads:")
        for model, snap in heads.items():
            click.echo(f"  {model:<24}{'snapshot ' + str(snap) if snap is not None else 'base (no snapshot)'}")
    else:
        click.echo("heads: none (every model is unedited)")
    if last:
        click.echo(f"last batch: {last.id} {last.status}, {last.n_edits} edits, {last.base_model}, "
                   f"started {fmt_time(last.started_at)}" + (f", finished {fmt_time(last.finished_at)}"
                                                              if last.finished_at else ""))
    else:
        click.echo("last batch: none yet")


@cli.command()
@click.argument("edit_id", metavar="ID", type=EDIT_ID)
@click.option("--reason", help="Why (kept in the audit trail).")
@click.option("--json", "as_json", is_flag=True, help="Print the record as JSON.")
@pass_app
def cancel(app: AppContext, edit_id: int, reason: str | None, as_json: bool) -> None:
    """Cancel a pending edit."""
    record = app.store().cancel(edit_id, actor=app.actor, reason=reason)
    if as_json:
        echo_json(record.to_dict())
    else:
        click.echo(f"edit {edit_id} cancelled")


cli.add_command(db)
cli.add_command(protect)


if __name__ == "__main__":
    main()
