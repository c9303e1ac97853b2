"""Key last-use times (shown to users) and run heartbeats (to mark vanished runs crashed).

Revision ID: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from gradexp.server.db import define_tables

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    md = sa.MetaData()
    define_tables(md, 2)
    for table, column in (("api_keys", "last_used_at"), ("runs", "heartbeat_at")):
        col = md.tables[table].c[column]
        op.add_column(table, sa.Column(column, col.type, nullable=True))
    op.create_index("ix_runs_status", "runs", ["status"])
