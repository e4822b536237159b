"""Database: typed SQLAlchemy 2 models, engine and sessions. The schema changes only via Alembic."""
