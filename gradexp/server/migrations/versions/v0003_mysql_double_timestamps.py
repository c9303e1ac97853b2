"""MySQL/MariaDB: timestamps as DOUBLE (databases made before were FLOAT); no-op elsewhere.

Revision ID: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from gradexp.server.db import define_tables

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if op.get_bind().dialect.name not in ("mysql", "mariadb"):
        return
    md = sa.MetaData()
    define_tables(md, 3)
    for table in md.sorted_tables:
        for col in table.columns:
            if isinstance(col.type, sa.Double):
                op.alter_column(table.name, col.name, type_=sa.Double(), existing_nullable=col.nullable)
