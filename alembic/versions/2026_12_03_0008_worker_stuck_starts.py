"""workers.stuck_starts, stuck_since, stuck_detail: pool children that took a job and never started it

A worker's main process kills a pool child that accepted a job but did not claim it within
LORP_JOB_START_TIMEOUT_S (the job's message goes back to the broker) and says so in its row: how
many such starts it has seen, and since when it is stuck (cleared when a job starts on it again).
/readyz and /metrics read them.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-03 12:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("workers", schema=None) as batch_op:
        batch_op.add_column(sa.Column("stuck_starts", sa.Integer(), server_default="0", nullable=False))
        batch_op.add_column(sa.Column("stuck_since", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("stuck_detail", sa.String(length=500), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("workers", schema=None) as batch_op:
        batch_op.drop_column("stuck_detail")
        batch_op.drop_column("stuck_since")
        batch_op.drop_column("stuck_starts")
