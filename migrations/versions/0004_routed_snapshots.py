"""snapshots.kind 'routed': a night's per-subject routes (daemon/night/routes.py)

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-07

A routed snapshot holds per-subject deltas served only in texts that name their subject; it changes no weight.
The CHECK on snapshots.kind gains 'routed'. On SQLite the table's CREATE statement is rewritten in place, as in
0003 (every existing row satisfies the wider constraint). Downgrade refuses while routed snapshots exist: they
cannot be expressed in the older schema (roll back to base and re-apply under scope = subject first).

Migration rules: see migrations/script.py.mako.
"""
from __future__ import annotations

from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None

OLD_KINDS = "kind IN ('incremental', 'consolidated')"
NEW_KINDS = "kind IN ('incremental', 'consolidated', 'routed')"


def upgrade() -> None:
    if op.get_context().dialect.name == "sqlite":
        _rewrite_sqlite_snapshots(OLD_KINDS, NEW_KINDS)
        return
    op.drop_constraint(op.f('ck_snapshots_kind'), 'snapshots', type_='check')
    op.create_check_constraint(op.f('ck_snapshots_kind'), 'snapshots', NEW_KINDS)


def downgrade() -> None:
    bind = op.get_bind()
    n = bind.execute(sa.text("SELECT count(*) FROM snapshots WHERE kind = 'routed'")).scalar_one()
    if n:
        raise RuntimeError(f"{n} routed snapshots exist; the schema below 0004 cannot hold them — roll back to base "
                           "(`horse-ledger rollback base --requeue`) and delete them, or restore a backup")
    if bind.dialect.name == "sqlite":
        _rewrite_sqlite_snapshots(NEW_KINDS, OLD_KINDS)
        return
    op.drop_constraint(op.f('ck_snapshots_kind'), 'snapshots', type_='check')
    op.create_check_constraint(op.f('ck_snapshots_kind'), 'snapshots', OLD_KINDS)


def _rewrite_sqlite_snapshots(old: str, new: str) -> None:
    """Replace the CREATE TABLE text of `snapshots` in sqlite_master and bump schema_version (0003 explains)."""
    conn = op.get_bind()
    sql = conn.exec_driver_sql("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'snapshots'").scalar_one()
    if sql.count(old) != 1:
        raise RuntimeError(f"the snapshots table's schema is not the one migration 0004 expects (no single {old!r}); "
                           "restore the database from a backup")
    version = conn.exec_driver_sql("PRAGMA schema_version").scalar_one()
    conn.exec_driver_sql("PRAGMA writable_schema = ON")
    try:
        conn.exec_driver_sql("UPDATE sqlite_master SET sql = ? WHERE type = 'table' AND name = 'snapshots'",
                             (sql.replace(old, new),))
        conn.exec_driver_sql(f"PRAGMA schema_version = {int(version) + 1}")
    finally:
        conn.exec_driver_sql("PRAGMA writable_schema = OFF")
