"""One Alembic revision per schema version: ``0001`` is version 1."""
