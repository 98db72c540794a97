"""The ledger counts member WebSocket connections and their messages (``ws_connections``),
as the Rust codex-gateway does ("SQLite usage accounting with tokens, request count, WS message
count, and WS connection count").

Revision ID: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    """Create ``ws_connections`` (see :data:`addons.gateway_mode.schema.ws_connections`)."""
    op.create_table(
        "ws_connections",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("row_id", sa.String(36), nullable=False, unique=True),
        sa.Column("member_id", BigId, sa.ForeignKey("members.id"), nullable=False),
        sa.Column("key_id", sa.String(32), nullable=False),
        sa.Column("upstream_key", sa.String(64), nullable=True),
        sa.Column("route", sa.String(64), nullable=False),
        sa.Column("model", sa.String(200), nullable=True),
        sa.Column("opened_ms", sa.BigInteger, nullable=False),
        sa.Column("closed_ms", sa.BigInteger, nullable=True),
        sa.Column("duration_ms", sa.BigInteger, nullable=True),
        sa.Column("client_messages", sa.BigInteger, nullable=False),
        sa.Column("upstream_messages", sa.BigInteger, nullable=False),
        sa.Column("turns", sa.Integer, nullable=False),
        sa.Column("close_reason", sa.String(200), nullable=True),
        sa.Column("instance", sa.String(64), nullable=False),
    )
    op.create_index("ws_connections_member_opened", "ws_connections", ["member_id", "opened_ms"])


def downgrade() -> None:
    """Drop ``ws_connections``."""
    op.drop_index("ws_connections_member_opened", "ws_connections")
    op.drop_table("ws_connections")
