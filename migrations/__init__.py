"""Alembic migrations for the ledger schema, as a package so they install with horse-ledger.

The schema exists only through these migrations. `script_location` is resolved from this file, so the
migrations work from a checkout and from an installed wheel alike:

    horse-ledger db upgrade                 # what the CLI runs (and Store() on first use)
    alembic -c migrations/alembic.ini revision --autogenerate -m "add edits.foo"   # a new migration
    alembic -c migrations/alembic.ini check  # models and migrations agree (uses HORSE_LEDGER_DB)
"""
from __future__ import annotations

import functools
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection

HERE = Path(__file__).resolve().parent


def alembic_config(connection: Connection | None = None, url: str | None = None) -> Config:
    """An Alembic Config pointing at this package; with `connection`, migrations run on it."""
    cfg = Config(str(HERE / "alembic.ini"))
    cfg.set_main_option("script_location", str(HERE))
    if url is not None:
        cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


@functools.cache
def head_revision() -> str:
    """The newest revision in this package (cached: the scripts do not change while we run)."""
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def current_revision(connection: Connection) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()


def upgrade(connection: Connection, revision: str = "head") -> None:
    """Upgrade on `connection`, inside the caller's transaction."""
    command.upgrade(alembic_config(connection), revision)


def downgrade(connection: Connection, revision: str) -> None:
    command.downgrade(alembic_config(connection), revision)
