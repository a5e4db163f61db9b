"""${message}

Revision ID: ${up_revision}
Revises: ${down_revision | comma,n}
Create Date: ${create_date}

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
${imports if imports else ""}

# revision identifiers, used by Alembic.
revision = ${repr(up_revision)}
down_revision = ${repr(down_revision)}
branch_labels = ${repr(branch_labels)}
depends_on = ${repr(depends_on)}


def upgrade() -> None:
    ${upgrades if upgrades else "pass"}


def downgrade() -> None:
    ${downgrades if downgrades else "pass"}
