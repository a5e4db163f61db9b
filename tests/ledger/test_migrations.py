"""migrations/ agree with ledger/models.py (autogenerate finds nothing) and go up, down and up again."""
from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, inspect

import migrations
from ledger.models import Base
from ledger.store import Store

TABLES = {"edits", "batches", "snapshots", "snapshot_edits", "heads", "events", "protected_facts"}


def _diff(url: str) -> list:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            ctx = MigrationContext.configure(conn, opts={"compare_type": True, "compare_server_default": True})
            return compare_metadata(ctx, Base.metadata)
    finally:
        engine.dispose()


def _tables(url: str) -> set[str]:
    engine = create_engine(url)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_one_linear_history():
    script = ScriptDirectory.from_config(migrations.alembic_config())
    assert len(script.get_heads()) == 1
    assert script.get_current_head() == migrations.head_revision()


def test_models_and_migrations_agree(empty_db_url):
    Store(empty_db_url).close()
    assert _diff(empty_db_url) == []


def test_upgrade_downgrade_upgrade(empty_db_url):
    store = Store(empty_db_url)
    assert TABLES <= _tables(empty_db_url)
    with store.engine.begin() as conn:
        migrations.downgrade(conn, "base")
    assert _tables(empty_db_url) - {"alembic_version"} == set()
    assert store.current_revision() is None
    assert store.upgrade() == migrations.head_revision()
    assert TABLES <= _tables(empty_db_url)
    store.close()
    assert _diff(empty_db_url) == []


def test_script_location_comes_from_the_package():
    cfg = migrations.alembic_config()
    assert cfg.get_main_option("script_location") == str(migrations.HERE)
    assert (migrations.HERE / "script.py.mako").read_text().count("Migration rules") == 1
