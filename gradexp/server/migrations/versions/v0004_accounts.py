"""Accounts: passwords, browser sessions, one-time authorization codes and sign-in links,
failed sign-ins (for the rate limit).

Revision ID: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from gradexp.server.db import define_tables

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    md = sa.MetaData()
    define_tables(md, 4)
    op.add_column("users", sa.Column("password_hash", md.tables["users"].c["password_hash"].type, nullable=True))
    md.create_all(op.get_bind(), tables=[md.tables[n] for n in ("sessions", "auth_codes", "login_failures",
                                                                 "signin_links")])
