"""The per-site catalog: SQLAlchemy models, engine setup with migration checks, and queries."""
