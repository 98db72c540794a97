"""The ledger tells refusals and warm-ups apart (issue 29, "``usage`` tells the truth"):
``refusals`` holds what the gateway answered itself instead of forwarding, by member and kind,
and ``usage.warmup`` marks Codex's WebSocket warm-ups (``"generate": false``), which are
neither requests nor turns. Rows written before it stay as they were (``warmup`` 0).

Revision ID: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    """Add ``usage.warmup`` (0 for existing rows) and create ``refusals`` (see
    :data:`addons.gateway_mode.schema.refusals`)."""
    with op.batch_alter_table("usage") as batch:
        batch.add_column(sa.Column("warmup", sa.Integer, nullable=False, server_default="0"))
    op.create_table(
        "refusals",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("row_id", sa.String(36), nullable=False, unique=True),
        sa.Column("ts_ms", sa.BigInteger, nullable=False),
        sa.Column("member_id", BigId, sa.ForeignKey("members.id"), nullable=True),
        sa.Column("key_id", sa.String(32), nullable=True),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("code", sa.String(64), nullable=False),
        sa.Column("status", sa.Integer, nullable=True),
        sa.Column("route", sa.String(64), nullable=False),
        sa.Column("model", sa.String(200), nullable=True),
        sa.Column("count", sa.Integer, nullable=False),
        sa.Column("instance", sa.String(64), nullable=False),
    )
    op.create_index("refusals_ts", "refusals", ["ts_ms"])


def downgrade() -> None:
    """Drop ``refusals`` and ``usage.warmup``."""
    op.drop_index("refusals_ts", "refusals")
    op.drop_table("refusals")
    with op.batch_alter_table("usage") as batch:
        batch.drop_column("warmup")
