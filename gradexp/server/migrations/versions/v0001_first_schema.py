"""The first schema: users, entities, API keys, projects, runs, parts, frames, history segments.

Revision ID: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from gradexp.server.db import define_tables

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    md = sa.MetaData()
    define_tables(md, 1)
    md.create_all(op.get_bind(), checkfirst=True)  # gradexp_schema may be there: see db.migrate
