"""`horse-ledger db`: the schema of the ledger database (upgrade to a revision, print the current one).

    horse-ledger db upgrade [--revision REV]        horse-ledger db current

Registered on the root group by `ledger.cli`.
"""
from __future__ import annotations

import click

from ledger.cliapp import AppContext, pass_app


@click.group()
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
