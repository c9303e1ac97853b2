"""A run's group and job type (wandb's ``group=`` and ``job_type=``).

Revision ID: 0007
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from gradexp.server.db import define_tables

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    md = sa.MetaData()
    define_tables(md, 7)
    for column in ("run_group", "job_type"):
        op.add_column("runs", sa.Column(column, md.tables["runs"].c[column].type, nullable=True))
