"""The first schema: members, member keys, usage ledger, leases, upstream key health.

Revision ID: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    """Create every table of :mod:`addons.gateway_mode.schema` as of revision 0001."""
    op.create_table(
        "members",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(64), nullable=False, unique=True),
        sa.Column("five_hour_quota", sa.BigInteger, nullable=False),
        sa.Column("weekly_quota", sa.BigInteger, nullable=False),
        sa.Column("five_hour_credits_micro", sa.BigInteger, nullable=False),
        sa.Column("weekly_credits_micro", sa.BigInteger, nullable=False),
        sa.Column("max_concurrent", sa.Integer, nullable=False),
        sa.Column("created_ms", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "member_keys",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("member_id", BigId, sa.ForeignKey("members.id"), nullable=False),
        sa.Column("key_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("created_ms", sa.BigInteger, nullable=False),
        sa.Column("last_used_ms", sa.BigInteger, nullable=True),
        sa.Column("revoked_ms", sa.BigInteger, nullable=True),
    )
    op.create_table(
        "usage",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("row_id", sa.String(36), nullable=False, unique=True),
        sa.Column("ts_ms", sa.BigInteger, nullable=False),
        sa.Column("member_id", BigId, sa.ForeignKey("members.id"), nullable=False),
        sa.Column("key_id", sa.String(32), nullable=False),
        sa.Column("upstream_key", sa.String(64), nullable=True),
        sa.Column("model", sa.String(200), nullable=True),
        sa.Column("route", sa.String(64), nullable=False),
        sa.Column("status", sa.Integer, nullable=True),
        sa.Column("input_tokens", sa.BigInteger, nullable=False),
        sa.Column("cached_tokens", sa.BigInteger, nullable=False),
        sa.Column("output_tokens", sa.BigInteger, nullable=False),
        sa.Column("reasoning_tokens", sa.BigInteger, nullable=False),
        sa.Column("total_tokens", sa.BigInteger, nullable=False),
        sa.Column("credits_micro", sa.BigInteger, nullable=True),
        sa.Column("rate", sa.String(200), nullable=True),
        sa.Column("service_tier", sa.String(32), nullable=True),
        sa.Column("duration_ms", sa.Integer, nullable=True),
        sa.Column("ttfb_ms", sa.Integer, nullable=True),
        sa.Column("events", sa.Integer, nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("error", sa.String(500), nullable=True),
        sa.Column("instance", sa.String(64), nullable=False),
    )
    op.create_index("usage_member_ts", "usage", ["member_id", "ts_ms"])
    op.create_table(
        "leases",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("member_id", BigId, sa.ForeignKey("members.id"), nullable=False),
        sa.Column("instance", sa.String(64), nullable=False),
        sa.Column("expires_ms", sa.BigInteger, nullable=False),
    )
    op.create_index("leases_member", "leases", ["member_id"])
    op.create_table(
        "upstream_keys",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("cooling_until_ms", sa.BigInteger, nullable=True),
        sa.Column("reason", sa.String(200), nullable=True),
        sa.Column("instance", sa.String(64), nullable=False),
        sa.Column("updated_ms", sa.BigInteger, nullable=False),
    )


def downgrade() -> None:
    """Drop every table."""
    for table in ("upstream_keys", "leases", "usage", "member_keys", "members"):
        op.drop_table(table)
