"""meter_reports.carried_forward_from / carried_forward_to: usage sent into a later billing period because its
own period's invoice had finalized (aikit.flush, aikit.periods)

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("meter_reports", sa.Column("carried_forward_from", sa.DateTime(timezone=True), nullable=True))
    op.add_column("meter_reports", sa.Column("carried_forward_to", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    op.drop_column("meter_reports", "carried_forward_to")
    op.drop_column("meter_reports", "carried_forward_from")
