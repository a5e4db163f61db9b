"""The `horse-ledger` command line: the root click group, the ledger's own commands, lazy engine/daemon commands.

    horse-ledger add --subject "Danielle Darrieux" --prompt "The mother tongue of {} is" --target English
    horse-ledger add --from facts.jsonl
    horse-ledger list --status pending      horse-ledger show 12      horse-ledger log --edit 12
    horse-ledger status                     horse-ledger cancel 12    horse-ledger db upgrade
    horse-ledger protect add --prompt "The capital of France is" --target Paris

Commands of `horse/` and `daemon/` are loaded from LAZY_COMMANDS on first use, so `horse-ledger add` never
imports torch. Domain errors (`LedgerError`, `horse.errors.EngineError`) are caught once, in
`LedgerGroup.invoke`: message and cause chain on stderr, exit 1, traceback only with `--debug`. Usage
errors exit 2 (click's default).
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import os
import sys
import traceback
import unicodedata
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Sequence

import click

from ledger.config import Settings, load_settings
from ledger.errors import LedgerError
from ledger.files import create_file, make_dir, process_umask
from ledger.params import BATCH_ID, EDIT_ID, LIMIT, PROTECTED_ID
from ledger.text import for_terminal, json_for_terminal

LAZY_COMMANDS = {
    "review": "ledger.review_cli:review",
    "hypernet": "horse.cli:hypernet", "eval": "horse.evalcli:eval_cmd", "model": "horse.evalcli:model",
    "apply": "daemon.cli:apply", "rollback": "daemon.cli:rollback", "snapshots": "daemon.cli:snapshots",
    "diff": "daemon.cli:diff", "verify": "daemon.cli:verify", "export": "daemon.cli:export",
    "ask": "daemon.cli:ask", "daemon": "daemon.cli:daemon", "init": "daemon.cli:init",
    "consolidate": "daemon.cli:consolidate", "serve": "daemon.web:serve", "config": "ledger.configcli:config",
}
DATE_FORMATS = ["%Y-%m-%d", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M:%S", "%Y-%m-%dT%H:%M"]
PROGRESS_MIN_ROWS = 1000


# ------------------------------------------------------------------------------------ context, errors

@dataclass
class AppContext:
    """`ctx.obj` of every command: the settings, the debug flag, and the store (opened on first use)."""

    settings: Settings
    debug: bool = False
    verbose: bool = False  # log lines (stages, counts) on a terminal too
    _store: Any = field(default=None, repr=False)

    def store(self, *, upgrade: bool = True) -> "Store":  # noqa: F821 - imported lazily
        """The Store for settings.db_url, opened once and upgraded to the schema head (unless upgrade=False)."""
        if self._store is None:
            from ledger.store import Store

            path = self.settings.db_path
            default = f"sqlite:///{Path(self.settings.data_dir) / 'ledger.db'}"
            if path is not None and self.settings.db_url == default:
                make_dir(path.parent, is_group=self.settings.file_mode_group)  # only the default location is created
            if path is not None and path.parent.is_dir():  # SQLite would create it 0644 & ~umask; its WAL copies it
                create_file(path, is_group=self.settings.file_mode_group)
            self._store = Store(self.settings.db_url, auto_upgrade=upgrade,
                                night_cap_per_identity=self.settings.review_max_edits_per_night)
            click.get_current_context().call_on_close(self._store.close)
        return self._store

    @property
    def actor(self) -> str:
        """Who is acting, for the audit trail: cli:<login name>."""
        try:
            import pwd

            return f"cli:{pwd.getpwuid(os.getuid()).pw_name}"
        except (ImportError, KeyError):
            return "cli"


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


# ------------------------------------------------------------------------------------------- output

def _echo_json(data: Any) -> None:
    # control and bidi characters escaped (the same JSON value): the terminal never acts on stored text
    click.echo(json_for_terminal(json.dumps(data, ensure_ascii=False, indent=2, default=str)))


def _fmt_time(value: datetime | None) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S") if value else "-"


def _clip(text: str | None, width: int) -> str:
    text = "-" if text is None or text == "" else for_terminal(str(text))
    return text if len(text) <= width else text[: width - 1] + "…"


def _width(text: str) -> int:
    """Terminal columns: wide (CJK) characters take two."""
    return sum(2 if unicodedata.east_asian_width(ch) in "WF" else 0 if unicodedata.combining(ch) else 1
               for ch in text)


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    cells = [[str(c) for c in row] for row in rows]
    widths = [max([_width(h)] + [_width(r[i]) for r in cells]) for i, h in enumerate(headers)]
    for row in [list(headers), *cells]:
        click.echo("  ".join(c + " " * (w - _width(c)) for c, w in zip(row, widths)).rstrip())


def _since(value: datetime | None) -> datetime | None:
    return value.replace(tzinfo=UTC) if value is not None and value.tzinfo is None else value


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


pass_app = click.make_pass_decorator(AppContext)


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
    from ledger.validate import read_edit_file, validate_edit

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
        _echo_json({**record.to_dict(), "created": result.created, "superseded_id": result.superseded_id})
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
        _echo_json({"added": len(created), "existing": existing, "superseded": superseded,
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
    edits = app.store().list_edits(status=list(status) or None, subject=subject, since=_since(since), limit=limit)
    if as_json:
        _echo_json([e.to_dict() for e in edits])
        return
    if not edits:
        click.echo("no edits match", err=True)
        return
    from ledger.review import review_state

    reviewed = any(review_state(e) != "-" for e in edits)  # a REVIEW column only when there is something to show
    _table(["ID", "STATUS", "SUBMITTED", "SUBJECT", "PROMPT", "TARGET"] + ["REVIEW"] * reviewed,
           [(e.id, e.status, _fmt_time(e.submitted_at), _clip(e.subject, 24), _clip(e.rendered_prompt, 44),
             _clip(e.target_new, 20)) + (_clip(review_state(e), 30),) * reviewed for e in edits])


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
        _echo_json({**edit.to_dict(), "events": [ev.to_dict() for ev in history]})
        return
    rows = [("status", edit.status), ("subject", edit.subject),
            ("aliases", " | ".join(edit.aliases) if edit.aliases else None), ("prompt", edit.prompt),
            ("rendered", edit.rendered_prompt), ("target", edit.target_new), ("target_true", edit.target_true),
            ("paraphrases", " | ".join(edit.paraphrases) if edit.paraphrases else None),
            ("source", edit.source), ("author", edit.author), ("note", edit.note),
            ("submitted", _fmt_time(edit.submitted_at)), ("attempts", edit.attempts), ("batch", edit.batch_id),
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
    click.echo(f"{indent}{_fmt_time(ev.at)}  {ev.kind:<18} {ids:<20} {ev.actor}{reason}".rstrip())


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
    events = app.store().events(edit_id=edit_id, batch_id=batch_id, since=_since(since), limit=limit, actor=actor)
    if as_json:
        _echo_json([ev.to_dict() for ev in events])
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
        _echo_json({"counts": counts, "total": sum(counts.values()), "heads": heads,
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
                   f"started {_fmt_time(last.started_at)}" + (f", finished {_fmt_time(last.finished_at)}"
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
        _echo_json(record.to_dict())
    else:
        click.echo(f"edit {edit_id} cancelled")


# ----------------------------------------------------------------------------------------------- db

@cli.group()
def db() -> None:
    """Database schema: upgrade, current revision."""


@db.command("upgrade")
@click.option("--revision", default="head", show_default=True, callback=lambda _c, p, v: _known_revision(v, p),
              help="Target revision (an id from migrations/versions, or head).")
@pass_app
def db_upgrade(app: AppContext, revision: str) -> None:
    """Upgrade the schema (a fresh database is also upgraded on first use)."""
    from migrations import head_revision

    rev = app.store(upgrade=False).upgrade(revision)
    click.echo(f"{rev}{' (head)' if rev == head_revision() else ''}")


def _known_revision(revision: str, param: click.Parameter) -> str:
    """`db upgrade --revision`: a revision id (or head / a prefix) that the migrations know, else exit 2."""
    from alembic.script import ScriptDirectory
    from alembic.util import CommandError

    from migrations import alembic_config

    script = ScriptDirectory.from_config(alembic_config())
    try:
        found = script.get_revisions(revision) if revision.strip() else ()
    except (CommandError, KeyError, ValueError) as exc:
        found, reason = (), str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    else:
        reason = "no such revision"
    if not found:
        known = ", ".join(r.revision for r in script.walk_revisions())
        raise click.BadParameter(f"{revision!r} is not a revision of this schema ({reason}); give head or one of "
                                 f"{known}", param=param)
    return revision


@db.command("current")
@pass_app
def db_current(app: AppContext) -> None:
    """Print the schema revision of the database."""
    from migrations import head_revision

    rev = app.store(upgrade=False).current_revision()
    if rev is None:
        click.echo("none (empty database; run `horse-ledger db upgrade`)")
    else:
        click.echo(f"{rev}{' (head)' if rev == head_revision() else ' (behind head ' + head_revision() + ')'}")


# ------------------------------------------------------------------------------------------ protect

@cli.group()
def protect() -> None:
    """Protected facts: facts every new snapshot must keep (the gate checks them)."""


@protect.command("add")
@click.option("--prompt", required=True, help="The prompt, with {} for the subject or containing it.")
@click.option("--target", required=True, help="The answer that must keep holding.")
@click.option("--subject", help="The subject (fills {} in the prompt).")
@click.option("--note", help="Why it is protected.")
@click.option("--json", "as_json", is_flag=True, help="Print the record as JSON.")
@pass_app
def protect_add(app: AppContext, prompt: str, target: str, subject: str | None, note: str | None,
                as_json: bool) -> None:
    """Protect a fact; prints its id."""
    record = app.store().add_protected(prompt=prompt, target=target, subject=subject, note=note, actor=app.actor)
    if as_json:
        _echo_json(record.to_dict())
    else:
        click.echo(record.id)


@protect.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_app
def protect_list(app: AppContext, as_json: bool) -> None:
    """List protected facts."""
    facts = app.store().list_protected()
    if as_json:
        _echo_json([f.to_dict() for f in facts])
        return
    if not facts:
        click.echo("no protected facts", err=True)
        return
    _table(["ID", "PROMPT", "TARGET", "NOTE"],
           [(f.id, _clip(f.rendered_prompt, 50), _clip(f.target, 24), _clip(f.note, 30)) for f in facts])


@protect.command("remove")
@click.argument("protected_id", metavar="ID", type=PROTECTED_ID)
@pass_app
def protect_remove(app: AppContext, protected_id: int) -> None:
    """Stop protecting a fact."""
    app.store().remove_protected(protected_id, actor=app.actor)
    click.echo(f"protected fact {protected_id} removed")


if __name__ == "__main__":
    main()
