"""create ledger tables

Revision ID: 0001
Revises: 
Create Date: 2026-11-25

Migration rules (read before writing one):
1. The schema exists only through migrations: change ledger/models.py and write the migration in the same
   commit; `alembic -c migrations/alembic.ini check` and tests/ledger/test_migrations.py must then find no
   difference on SQLite and on PostgreSQL.
2. Revision ids are sequential and readable ("0002"), slugs say what changed ("add edits.priority").
3. Every constraint and index has a name (the MetaData naming convention gives one; do not override it
   with None). SQLite needs names to alter constraints in batch mode.
4. Use `op.batch_alter_table` for any ALTER on an existing table (SQLite); env.py sets render_as_batch.
5. Write `downgrade()` too, and keep upgrade → downgrade → upgrade working (the tests run it).
6. Never rewrite or delete `events` rows: the audit trail is append-only (triggers enforce it).
7. Data migrations use plain SQL or `sa.table()` stubs, never ledger.models (the models move on).
8. New NOT NULL columns on existing tables need a server_default (or a backfill before the constraint).
"""
from __future__ import annotations

from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('batches',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('token', sa.String(length=64), nullable=False),
    sa.Column('base_model', sa.String(length=200), nullable=False),
    sa.Column('status', sa.String(length=32), nullable=False),
    sa.Column('actor', sa.String(length=200), nullable=False),
    sa.Column('n_edits', sa.Integer(), server_default=sa.text('0'), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('metrics', sa.JSON(), nullable=False),
    sa.Column('error', sa.Text(), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_batches')),
    sa.UniqueConstraint('token', name=op.f('uq_batches_token'))
    )
    op.create_index('ix_batches_status_id', 'batches', ['status', 'id'], unique=False)

    op.create_table('events',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('actor', sa.String(length=200), nullable=False),
    sa.Column('kind', sa.String(length=64), nullable=False),
    sa.Column('edit_id', sa.Integer(), nullable=True),
    sa.Column('batch_id', sa.Integer(), nullable=True),
    sa.Column('snapshot_id', sa.Integer(), nullable=True),
    sa.Column('reason', sa.Text(), nullable=True),
    sa.Column('payload', sa.JSON(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_events'))
    )
    op.create_index(op.f('ix_events_at'), 'events', ['at'], unique=False)
    op.create_index(op.f('ix_events_batch_id'), 'events', ['batch_id'], unique=False)
    op.create_index(op.f('ix_events_edit_id'), 'events', ['edit_id'], unique=False)
    op.create_index(op.f('ix_events_snapshot_id'), 'events', ['snapshot_id'], unique=False)

    op.create_table('protected_facts',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('subject', sa.String(length=2000), nullable=True),
    sa.Column('prompt', sa.String(length=2000), nullable=False),
    sa.Column('target', sa.String(length=2000), nullable=False),
    sa.Column('note', sa.String(length=2000), nullable=True),
    sa.Column('author', sa.String(length=2000), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_protected_facts'))
    )
    op.create_table('snapshots',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('parent_id', sa.Integer(), nullable=True),
    sa.Column('batch_id', sa.Integer(), nullable=True),
    sa.Column('base_model', sa.String(length=200), nullable=False),
    sa.Column('kind', sa.String(length=16), server_default=sa.text("'incremental'"), nullable=False),
    sa.Column('path', sa.String(length=1000), nullable=False),
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('bytes', sa.BigInteger(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('status', sa.String(length=16), server_default=sa.text("'published'"), nullable=False),
    sa.Column('metrics', sa.JSON(), nullable=False),
    sa.CheckConstraint("kind IN ('incremental', 'consolidated')", name=op.f('ck_snapshots_kind')),
    sa.CheckConstraint("status IN ('published', 'rolled_back')", name=op.f('ck_snapshots_status')),
    sa.ForeignKeyConstraint(['batch_id'], ['batches.id'], name=op.f('fk_snapshots_batch_id_batches')),
    sa.ForeignKeyConstraint(['parent_id'], ['snapshots.id'], name=op.f('fk_snapshots_parent_id_snapshots')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_snapshots'))
    )
    op.create_index(op.f('ix_snapshots_base_model'), 'snapshots', ['base_model'], unique=False)
    op.create_index(op.f('ix_snapshots_batch_id'), 'snapshots', ['batch_id'], unique=False)
    op.create_index(op.f('ix_snapshots_parent_id'), 'snapshots', ['parent_id'], unique=False)

    op.create_table('edits',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('subject', sa.String(length=2000), nullable=False),
    sa.Column('prompt', sa.String(length=2000), nullable=False),
    sa.Column('target_new', sa.String(length=2000), nullable=False),
    sa.Column('target_true', sa.String(length=2000), nullable=True),
    sa.Column('paraphrases', sa.JSON(), nullable=False),
    sa.Column('source', sa.String(length=2000), nullable=True),
    sa.Column('author', sa.String(length=2000), nullable=True),
    sa.Column('note', sa.String(length=2000), nullable=True),
    sa.Column('submitted_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('content_hash', sa.String(length=64), nullable=False),
    sa.Column('key_hash', sa.String(length=64), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('attempts', sa.Integer(), server_default=sa.text('0'), nullable=False),
    sa.Column('batch_id', sa.Integer(), nullable=True),
    sa.Column('snapshot_id', sa.Integer(), nullable=True),
    sa.Column('claim_token', sa.String(length=64), nullable=True),
    sa.Column('claimed_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('heartbeat_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('last_error', sa.Text(), nullable=True),
    sa.Column('supersedes_id', sa.Integer(), nullable=True),
    sa.Column('superseded_by_id', sa.Integer(), nullable=True),
    sa.CheckConstraint("status IN ('pending', 'claimed', 'applied', 'failed', 'rejected', 'cancelled', 'superseded', 'rolled_back')", name=op.f('ck_edits_status')),
    sa.CheckConstraint('attempts >= 0', name=op.f('ck_edits_attempts_nonnegative')),
    sa.ForeignKeyConstraint(['batch_id'], ['batches.id'], name=op.f('fk_edits_batch_id_batches')),
    sa.ForeignKeyConstraint(['snapshot_id'], ['snapshots.id'], name=op.f('fk_edits_snapshot_id_snapshots')),
    sa.ForeignKeyConstraint(['superseded_by_id'], ['edits.id'], name=op.f('fk_edits_superseded_by_id_edits')),
    sa.ForeignKeyConstraint(['supersedes_id'], ['edits.id'], name=op.f('fk_edits_supersedes_id_edits')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_edits'))
    )
    op.create_index(op.f('ix_edits_batch_id'), 'edits', ['batch_id'], unique=False)
    op.create_index(op.f('ix_edits_claim_token'), 'edits', ['claim_token'], unique=False)
    op.create_index(op.f('ix_edits_content_hash'), 'edits', ['content_hash'], unique=False)
    op.create_index(op.f('ix_edits_key_hash'), 'edits', ['key_hash'], unique=False)
    op.create_index(op.f('ix_edits_snapshot_id'), 'edits', ['snapshot_id'], unique=False)
    op.create_index('ix_edits_status_heartbeat_at', 'edits', ['status', 'heartbeat_at'], unique=False)
    op.create_index('ix_edits_status_id', 'edits', ['status', 'id'], unique=False)
    op.create_index('ix_edits_submitted_at', 'edits', ['submitted_at'], unique=False)

    op.create_table('heads',
    sa.Column('base_model', sa.String(length=200), nullable=False),
    sa.Column('snapshot_id', sa.Integer(), nullable=True),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['snapshot_id'], ['snapshots.id'], name=op.f('fk_heads_snapshot_id_snapshots')),
    sa.PrimaryKeyConstraint('base_model', name=op.f('pk_heads'))
    )
    op.create_table('snapshot_edits',
    sa.Column('snapshot_id', sa.Integer(), nullable=False),
    sa.Column('edit_id', sa.Integer(), nullable=False),
    sa.ForeignKeyConstraint(['edit_id'], ['edits.id'], name=op.f('fk_snapshot_edits_edit_id_edits')),
    sa.ForeignKeyConstraint(['snapshot_id'], ['snapshots.id'], name=op.f('fk_snapshot_edits_snapshot_id_snapshots'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('snapshot_id', 'edit_id', name=op.f('pk_snapshot_edits'))
    )
    op.create_index(op.f('ix_snapshot_edits_edit_id'), 'snapshot_edits', ['edit_id'], unique=False)
    _create_append_only_triggers()



def downgrade() -> None:
    _drop_append_only_triggers()
    op.drop_index(op.f('ix_snapshot_edits_edit_id'), table_name='snapshot_edits')

    op.drop_table('snapshot_edits')
    op.drop_table('heads')
    op.drop_index('ix_edits_submitted_at', table_name='edits')
    op.drop_index('ix_edits_status_id', table_name='edits')
    op.drop_index('ix_edits_status_heartbeat_at', table_name='edits')
    op.drop_index(op.f('ix_edits_snapshot_id'), table_name='edits')
    op.drop_index(op.f('ix_edits_key_hash'), table_name='edits')
    op.drop_index(op.f('ix_edits_content_hash'), table_name='edits')
    op.drop_index(op.f('ix_edits_claim_token'), table_name='edits')
    op.drop_index(op.f('ix_edits_batch_id'), table_name='edits')

    op.drop_table('edits')
    op.drop_index(op.f('ix_snapshots_parent_id'), table_name='snapshots')
    op.drop_index(op.f('ix_snapshots_batch_id'), table_name='snapshots')
    op.drop_index(op.f('ix_snapshots_base_model'), table_name='snapshots')

    op.drop_table('snapshots')
    op.drop_table('protected_facts')
    op.drop_index(op.f('ix_events_snapshot_id'), table_name='events')
    op.drop_index(op.f('ix_events_edit_id'), table_name='events')
    op.drop_index(op.f('ix_events_batch_id'), table_name='events')
    op.drop_index(op.f('ix_events_at'), table_name='events')

    op.drop_table('events')
    op.drop_index('ix_batches_status_id', table_name='batches')

    op.drop_table('batches')


# The audit trail is append-only: the database itself refuses UPDATE and DELETE on events.
def _create_append_only_triggers() -> None:
    if op.get_context().dialect.name == "sqlite":
        for verb in ("UPDATE", "DELETE"):
            op.execute(f"CREATE TRIGGER events_append_only_{verb.lower()} BEFORE {verb} ON events "
                       "BEGIN SELECT RAISE(ABORT, 'events are append-only'); END")
    elif op.get_context().dialect.name == "postgresql":
        op.execute("CREATE FUNCTION events_append_only() RETURNS trigger LANGUAGE plpgsql AS $$ "
                   "BEGIN RAISE EXCEPTION 'events are append-only'; END $$")
        op.execute("CREATE TRIGGER events_append_only BEFORE UPDATE OR DELETE ON events "
                   "FOR EACH STATEMENT EXECUTE FUNCTION events_append_only()")


def _drop_append_only_triggers() -> None:
    if op.get_context().dialect.name == "sqlite":
        op.execute("DROP TRIGGER IF EXISTS events_append_only_update")
        op.execute("DROP TRIGGER IF EXISTS events_append_only_delete")
    elif op.get_context().dialect.name == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS events_append_only ON events")
        op.execute("DROP FUNCTION IF EXISTS events_append_only()")
