"""billing_periods (each customer's Stripe billing periods) and meter_event_errors (Stripe's asynchronous
rejections of meter events)

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "billing_periods",
        sa.Column("subscription_id", sa.String(length=255), nullable=False),
        sa.Column("period_start", sa.DateTime(timezone=True), nullable=False),
        sa.Column("period_end", sa.DateTime(timezone=True), nullable=False),
        sa.Column("customer_id", sa.String(length=255), nullable=False),
        sa.Column("source", sa.String(length=16), nullable=False),
        sa.Column("event_created", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("subscription_id", "period_start", name=op.f("pk_billing_periods")),
    )
    op.create_index("ix_billing_periods_customer_end", "billing_periods", ["customer_id", "period_end"],
                    unique=False)
    op.create_table(
        "meter_event_errors",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False),
        sa.Column("event_id", sa.String(length=255), nullable=False),
        sa.Column("event_type", sa.String(length=128), nullable=False),
        sa.Column("code", sa.String(length=128), nullable=False),
        sa.Column("message", sa.Text(), nullable=True),
        sa.Column("identifier", sa.String(length=255), nullable=True),
        sa.Column("report_id", sa.String(length=64), nullable=True),
        sa.Column("matched_by", sa.String(length=16), nullable=False),
        sa.Column("meter_id", sa.String(length=255), nullable=True),
        sa.Column("validation_start", sa.DateTime(timezone=True), nullable=True),
        sa.Column("validation_end", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_meter_event_errors")),
    )
    op.create_index(op.f("ix_meter_event_errors_event_id"), "meter_event_errors", ["event_id"], unique=False)
    op.create_index("ix_meter_event_errors_report", "meter_event_errors", ["report_id"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_meter_event_errors_report", table_name="meter_event_errors")
    op.drop_index(op.f("ix_meter_event_errors_event_id"), table_name="meter_event_errors")
    op.drop_table("meter_event_errors")
    op.drop_index("ix_billing_periods_customer_end", table_name="billing_periods")
    op.drop_table("billing_periods")
