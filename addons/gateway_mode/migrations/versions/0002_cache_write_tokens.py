"""The usage ledger records prompt-cache writes (``input_tokens_details.cache_write_tokens``,
reported by the Responses API to Codex 0.171, which shows them as ``cache_write_input_tokens``).

Revision ID: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Add ``usage.cache_write_tokens`` (0 for the rows written before it existed)."""
    with op.batch_alter_table("usage") as batch:
        batch.add_column(
            sa.Column("cache_write_tokens", sa.BigInteger, nullable=False, server_default="0")
        )


def downgrade() -> None:
    """Drop ``usage.cache_write_tokens``."""
    with op.batch_alter_table("usage") as batch:
        batch.drop_column("cache_write_tokens")
