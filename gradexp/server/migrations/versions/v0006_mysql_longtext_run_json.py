"""MySQL/MariaDB: a run's tags, notes, config and summary as LONGTEXT (TEXT made a summary
over 64 KiB fail); no-op elsewhere.

Revision ID: 0006
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from gradexp.server.db import define_tables

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if op.get_bind().dialect.name not in ("mysql", "mariadb"):
        return
    md = sa.MetaData()
    define_tables(md, 6)
    runs = md.tables["runs"]
    # One ALTER for the four columns: MySQL/MariaDB copy the whole table for each statement.
    op.execute("ALTER TABLE runs " + ", ".join(
        f"MODIFY COLUMN {name} LONGTEXT {'NULL' if runs.c[name].nullable else 'NOT NULL'}"
        for name in ("tags", "notes", "config", "summary")))
