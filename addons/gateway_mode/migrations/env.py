"""Alembic environment: runs online against the connection the gateway hands in
(``config.attributes["connection"]``); no ``alembic.ini`` is needed."""

from __future__ import annotations

from alembic import context

from addons.gateway_mode.schema import metadata

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
