"""MySQL/MariaDB: ``frames.key`` in utf8mb4 with a binary, no-pad collation; no-op elsewhere.

Any key of up to ``KEY_CHARS`` characters then fits (in a database made with the server's
default character set, latin1 on MariaDB 10, a 4-byte character was refused), and keys
compare exactly (under the default collations "w", "W" and "w " were one key, so reading
one could return another's tensor).

Revision ID: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

KEY_CHARS = 1024
"""The longest tensor key as of this revision: a revision keeps the schema it made, whatever
the limit becomes later (a later revision would change the column)."""

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    conn = op.get_bind()
    if conn.dialect.name not in ("mysql", "mariadb"):
        return
    have = {row[0] for row in conn.execute(sa.text("SHOW COLLATION WHERE Charset = 'utf8mb4'"))}
    # MariaDB's binary no-pad collation, MySQL 8's, then the plain binary one (pads with spaces).
    collation = next(c for c in ("utf8mb4_nopad_bin", "utf8mb4_0900_bin", "utf8mb4_bin") if c in have)
    op.execute(f"ALTER TABLE frames MODIFY COLUMN `key` VARCHAR({KEY_CHARS}) "
               f"CHARACTER SET utf8mb4 COLLATE {collation} NOT NULL")
