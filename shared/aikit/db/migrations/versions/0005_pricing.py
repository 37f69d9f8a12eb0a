"""Pricing: cost per usage row and rollup, the meter of each report, per-key model allow-lists

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

_OPEN = sa.text("status = 'open'")


def upgrade() -> None:
    with op.batch_alter_table("api_key_usage") as batch:
        batch.add_column(sa.Column("cost", sa.BigInteger(), nullable=False, server_default="0"))
    with op.batch_alter_table("usage_daily") as batch:
        batch.add_column(sa.Column("cost", sa.BigInteger(), nullable=False, server_default="0"))
    with op.batch_alter_table("api_keys") as batch:
        batch.add_column(sa.Column("allowed_models", sa.Text(), nullable=True))
    op.drop_index("uq_meter_reports_open_window", table_name="meter_reports", postgresql_where=_OPEN,
                  sqlite_where=_OPEN)
    with op.batch_alter_table("meter_reports") as batch:
        batch.add_column(sa.Column("meter", sa.String(length=16), nullable=False, server_default="tokens"))
    # One open report per customer, window and meter.
    op.create_index("uq_meter_reports_open_window", "meter_reports", ["customer_id", "window_start", "meter"],
                    unique=True, postgresql_where=_OPEN, sqlite_where=_OPEN)


def downgrade() -> None:
    op.drop_index("uq_meter_reports_open_window", table_name="meter_reports", postgresql_where=_OPEN,
                  sqlite_where=_OPEN)
    with op.batch_alter_table("meter_reports") as batch:
        batch.drop_column("meter")
    op.create_index("uq_meter_reports_open_window", "meter_reports", ["customer_id", "window_start"],
                    unique=True, postgresql_where=_OPEN, sqlite_where=_OPEN)
    with op.batch_alter_table("api_keys") as batch:
        batch.drop_column("allowed_models")
    with op.batch_alter_table("usage_daily") as batch:
        batch.drop_column("cost")
    with op.batch_alter_table("api_key_usage") as batch:
        batch.drop_column("cost")
