"""Alembic's environment and revisions of the server's schema (``db.migrate`` runs them)."""
