"""Keys that expire and the audit log (issue 32, "Gateway governance"): ``member_keys.expires_ms``
(``NULL``: the key never expires, as every key before this revision) and the ``audit_log``
table of admin changes. Additive: rows written before it stay as they were.

Revision ID: 0008_key_expiry_audit
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008_key_expiry_audit"
#: The revision before this one (0007_teams.py).
down_revision = "0007_teams"
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    """Add ``member_keys.expires_ms`` (null for existing keys) and create ``audit_log`` (see
    :data:`addons.gateway_mode.schema.audit_log`)."""
    with op.batch_alter_table("member_keys") as batch:
        batch.add_column(sa.Column("expires_ms", sa.BigInteger, nullable=True))
    op.create_table(
        "audit_log",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("ts_ms", sa.BigInteger, nullable=False),
        sa.Column("actor", sa.String(128), nullable=False),
        sa.Column("host", sa.String(255), nullable=True),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("target", sa.String(200), nullable=False),
        sa.Column("before", sa.Text, nullable=True),
        sa.Column("after", sa.Text, nullable=True),
    )
    op.create_index("audit_log_ts", "audit_log", ["ts_ms"])


def downgrade() -> None:
    """Drop ``audit_log`` and ``member_keys.expires_ms``."""
    op.drop_index("audit_log_ts", "audit_log")
    op.drop_table("audit_log")
    with op.batch_alter_table("member_keys") as batch:
        batch.drop_column("expires_ms")
