"""Members without static keys (issue 31): ``member_identities`` maps OIDC identities
(issuer, audience, claim patterns) to members, and ``usage.subject`` keeps the token's ``sub``
beside the identity's id in ``key_id``. Rows written before it stay as they were.

Revision ID: 0009_identities
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009_identities"
#: The revision before this one (0008_key_expiry_audit.py).
down_revision = "0008_key_expiry_audit"
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    """Create ``member_identities`` (see :data:`addons.gateway_mode.schema.member_identities`)
    and add the nullable ``usage.subject``."""
    op.create_table(
        "member_identities",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("member_id", BigId, sa.ForeignKey("members.id"), nullable=False),
        sa.Column("issuer", sa.String(500), nullable=False),
        sa.Column("audience", sa.String(500), nullable=False),
        sa.Column("claims", sa.String(4000), nullable=False),
        sa.Column("created_ms", sa.BigInteger, nullable=False),
        sa.Column("removed_ms", sa.BigInteger, nullable=True),
        sa.Column("expires_ms", sa.BigInteger, nullable=True),
    )
    op.create_index("member_identities_issuer", "member_identities", ["issuer"])
    with op.batch_alter_table("usage") as batch:
        batch.add_column(sa.Column("subject", sa.String(255), nullable=True))


def downgrade() -> None:
    """Drop ``usage.subject`` and ``member_identities``."""
    with op.batch_alter_table("usage") as batch:
        batch.drop_column("subject")
    op.drop_index("member_identities_issuer", "member_identities")
    op.drop_table("member_identities")
