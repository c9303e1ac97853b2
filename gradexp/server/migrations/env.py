"""Alembic's environment: runs the revisions on the connection ``db.migrate`` passes in.

Each revision runs in its own transaction and is recorded in ``gradexp_schema`` too, the
version table that releases before Alembic read (see ``db``)."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

import sqlalchemy as sa
from alembic import context
from alembic.runtime.migration import MigrationContext, MigrationInfo

from gradexp.server import db


def _record(ctx: MigrationContext, step: MigrationInfo, heads: Collection[Any], run_args: Mapping[str, Any]) -> None:
    """After each revision, in its transaction: its version into ``gradexp_schema``."""
    if step.is_upgrade and not step.is_stamp and step.up_revision_id is not None and ctx.connection is not None:
        ctx.connection.execute(sa.insert(db.schema_version).values(version=int(step.up_revision_id)))


connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("gradexp's migrations run through gradexp.server.db.migrate (or `gradexp server`), "
                       "which passes the database connection in")
context.configure(connection=connection, target_metadata=db.meta, transaction_per_migration=True,
                  on_version_apply=_record)
with context.begin_transaction():
    context.run_migrations()
