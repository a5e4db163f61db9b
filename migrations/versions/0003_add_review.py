"""add review: edits.status 'proposed', edits.submitted_by / review / reviewed_by / reviewed_at

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-07

Review (ledger/review.py): with review on, a new edit is `proposed` until someone other than its submitter
approves it (→ pending) or rejects it. Existing edits keep their status; their submitter is unknown (NULL).

SQLite cannot ALTER a CHECK constraint, and batch mode's copy-and-DROP of `edits` is refused by the foreign
keys once edits exist (PRAGMA foreign_keys cannot be turned off inside the migration's transaction), so on
SQLite the table's CREATE statement is rewritten in place: SQLite's documented procedure for changing
constraints that every existing row already satisfies (sqlite.org/lang_altertable.html, "otheralter").
Downgrade first cancels proposed edits (with an event each: nothing unreviewed may become claimable).

Migration rules: see migrations/script.py.mako.
"""
from __future__ import annotations

from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None

OLD_STATUSES = "'pending', 'claimed', 'applied', 'failed', 'rejected', 'cancelled', 'superseded', 'rolled_back'"
NEW_STATUSES = OLD_STATUSES + ", 'proposed'"
REVIEW_CHECK = "review IS NULL OR review IN ('approved', 'rejected')"


def upgrade() -> None:
    op.add_column('edits', sa.Column('submitted_by', sa.String(length=200), nullable=True))
    op.add_column('edits', sa.Column('review', sa.String(length=16), nullable=True))
    op.add_column('edits', sa.Column('reviewed_by', sa.String(length=200), nullable=True))
    op.add_column('edits', sa.Column('reviewed_at', sa.DateTime(timezone=True), nullable=True))
    op.create_index('ix_edits_submitted_by_submitted_at', 'edits', ['submitted_by', 'submitted_at'], unique=False)
    if op.get_context().dialect.name == "sqlite":
        _rewrite_sqlite_edits(lambda sql: _replace_once(sql, f"status IN ({OLD_STATUSES})",
                                                        f"status IN ({NEW_STATUSES})")
                              .rstrip().removesuffix(")") + f", CONSTRAINT ck_edits_review CHECK ({REVIEW_CHECK}))")
        return
    op.drop_constraint(op.f('ck_edits_status'), 'edits', type_='check')
    op.create_check_constraint(op.f('ck_edits_status'), 'edits', f"status IN ({NEW_STATUSES})")
    op.create_check_constraint(op.f('ck_edits_review'), 'edits', REVIEW_CHECK)


def downgrade() -> None:
    bind = op.get_bind()
    ids = [row[0] for row in bind.execute(sa.text("SELECT id FROM edits WHERE status = 'proposed' ORDER BY id"))]
    if ids:
        events = sa.table('events', sa.column('at', sa.DateTime(timezone=True)), sa.column('actor', sa.String),
                          sa.column('kind', sa.String), sa.column('edit_id', sa.Integer),
                          sa.column('reason', sa.Text), sa.column('payload', sa.JSON))
        now = sa.func.now() if bind.dialect.name == "postgresql" else sa.func.datetime("now")
        reason = "schema downgraded below 0003 (review): an unreviewed edit cannot stay queued"
        for edit_id in ids:
            op.execute(events.insert().values(at=now, actor="migration:0003", kind="edit.cancelled", edit_id=edit_id,
                                              reason=reason, payload={"from": "proposed", "to": "cancelled"}))
        op.execute("UPDATE edits SET status = 'cancelled' WHERE status = 'proposed'")
    if bind.dialect.name == "sqlite":
        _rewrite_sqlite_edits(lambda sql: _replace_once(
            _replace_once(sql, f", CONSTRAINT ck_edits_review CHECK ({REVIEW_CHECK})", ""),
            f"status IN ({NEW_STATUSES})", f"status IN ({OLD_STATUSES})"))
    else:
        op.drop_constraint(op.f('ck_edits_review'), 'edits', type_='check')
        op.drop_constraint(op.f('ck_edits_status'), 'edits', type_='check')
        op.create_check_constraint(op.f('ck_edits_status'), 'edits', f"status IN ({OLD_STATUSES})")
    op.drop_index('ix_edits_submitted_by_submitted_at', table_name='edits')
    for column in ('reviewed_at', 'reviewed_by', 'review', 'submitted_by'):
        if bind.dialect.name == "sqlite":  # in place (SQLite ≥ 3.35); see 0002
            op.execute(f"ALTER TABLE edits DROP COLUMN {column}")
        else:
            op.drop_column('edits', column)


def _replace_once(sql: str, old: str, new: str) -> str:
    if sql.count(old) != 1:
        raise RuntimeError(f"the edits table's schema is not the one migration 0003 expects (no single {old!r}); "
                           "restore the database from a backup or recreate it with `horse-ledger db upgrade`")
    return sql.replace(old, new)


def _rewrite_sqlite_edits(change) -> None:  # noqa: ANN001
    """Replace the CREATE TABLE text of `edits` in sqlite_master and bump schema_version (in the caller's
    transaction), so every connection re-reads it. Only for changes every existing row satisfies."""
    conn = op.get_bind()
    sql = conn.exec_driver_sql("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'edits'").scalar_one()
    version = conn.exec_driver_sql("PRAGMA schema_version").scalar_one()
    conn.exec_driver_sql("PRAGMA writable_schema = ON")
    try:
        conn.exec_driver_sql("UPDATE sqlite_master SET sql = ? WHERE type = 'table' AND name = 'edits'",
                             (change(sql),))
        conn.exec_driver_sql(f"PRAGMA schema_version = {int(version) + 1}")
    finally:
        conn.exec_driver_sql("PRAGMA writable_schema = OFF")
