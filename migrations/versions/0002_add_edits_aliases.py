"""add edits.aliases

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01

Other names of an edit's subject ("Messi" for "Lionel Messi"), a JSON list of strings; existing edits get
the empty list (server default; jsonb on PostgreSQL, where json cannot be compared). Not part of content_hash or key_hash: those keep their meaning.

Migration rules: see migrations/script.py.mako (the same eight rules as 0001).
"""
from __future__ import annotations

from alembic import op
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql


# revision identifiers, used by Alembic.
revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # a plain ALTER TABLE ADD COLUMN on both backends (SQLite allows it with a constant default); batch mode
    # would copy and DROP the edits table, which the foreign keys refuse once edits exist
    op.add_column('edits', sa.Column('aliases', sa.JSON().with_variant(postgresql.JSONB(), 'postgresql'),
                                     server_default=sa.text("'[]'"), nullable=False))


def downgrade() -> None:
    if op.get_context().dialect.name == "sqlite":
        # SQLite ≥ 3.35 drops a plain column in place (not batch mode: see upgrade)
        op.execute("ALTER TABLE edits DROP COLUMN aliases")
        return
    op.drop_column('edits', 'aliases')
