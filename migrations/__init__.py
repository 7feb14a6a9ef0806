"""Alembic migrations of the catalog schema (installed as `datamover.migrations`)."""
