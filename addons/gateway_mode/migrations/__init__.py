"""Alembic migrations of the gateway's schema (run by ``./run.sh gateway init``)."""
