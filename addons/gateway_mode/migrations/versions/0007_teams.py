"""Teams (issue 32, "Teams"): a ``teams`` table with the member quota columns and a model
pattern list, ``members.team_id`` (a member is in one team or none), and the team a request
was spent under on its ``usage`` and ``refusals`` rows and on its concurrency lease (so a
member who changes team leaves its past usage with the old team). Existing rows get no team.

Revision ID: 0007_teams
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007_teams"
#: The revision before this one (0006_member_models.py).
down_revision = "0006_member_models"
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    """Create ``teams`` and add the nullable ``team_id`` columns (see
    :data:`addons.gateway_mode.schema.teams`)."""
    op.create_table(
        "teams",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(64), nullable=False, unique=True),
        sa.Column("five_hour_quota", sa.BigInteger, nullable=False),
        sa.Column("weekly_quota", sa.BigInteger, nullable=False),
        sa.Column("five_hour_credits_micro", sa.BigInteger, nullable=False),
        sa.Column("weekly_credits_micro", sa.BigInteger, nullable=False),
        sa.Column("max_concurrent", sa.Integer, nullable=False),
        sa.Column("models", sa.String(2000), nullable=False, server_default=""),
        sa.Column("created_ms", sa.BigInteger, nullable=False),
    )
    if op.get_context().dialect.name == "sqlite":
        # SQLite adds a column with its reference in place; batch mode would copy the table,
        # and dropping the old one trips the foreign keys of member_keys and usage.
        op.execute("ALTER TABLE members ADD COLUMN team_id INTEGER REFERENCES teams (id)")
    else:
        op.add_column("members", sa.Column("team_id", BigId, nullable=True))
        op.create_foreign_key("members_team_id_fkey", "members", "teams", ["team_id"], ["id"])
    for table in ("usage", "refusals", "leases"):
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column("team_id", BigId, nullable=True))
    op.create_index("usage_team_ts", "usage", ["team_id", "ts_ms"])
    op.create_index("leases_team", "leases", ["team_id"])


def downgrade() -> None:
    """Drop the ``team_id`` columns and ``teams``."""
    op.drop_index("leases_team", "leases")
    op.drop_index("usage_team_ts", "usage")
    for table in ("leases", "refusals", "usage"):
        with op.batch_alter_table(table) as batch:
            batch.drop_column("team_id")
    if op.get_context().dialect.name == "sqlite":
        op.execute("PRAGMA defer_foreign_keys = ON")  # the copy of members is checked at commit
        with op.batch_alter_table("members") as batch:
            batch.drop_column("team_id")
    else:
        op.drop_constraint("members_team_id_fkey", "members", type_="foreignkey")
        op.drop_column("members", "team_id")
    op.drop_table("teams")
