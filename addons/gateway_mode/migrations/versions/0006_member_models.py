"""Models per member (issue 32, "Gateway governance"): ``members.models`` holds the model
patterns a member may use (``add-member`` / ``set-member --models``), comma-separated; ``NULL``
(every member before this revision) allows every model.

Revision ID: 0006_member_models
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006_member_models"
# The file 0004_refusals_and_warmups.py, whose revision id is "0004".
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Add ``members.models`` (nullable; existing members keep every model)."""
    with op.batch_alter_table("members") as batch:
        batch.add_column(sa.Column("models", sa.String(2000), nullable=True))


def downgrade() -> None:
    """Drop ``members.models``."""
    with op.batch_alter_table("members") as batch:
        batch.drop_column("models")
