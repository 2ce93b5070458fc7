"""jobs.deleted_at and jobs.purged_at: deleting and expiring jobs

A deleted (or expired) job is hidden from the API at once (deleted_at); once it has stopped, its
stored files and result rows are removed and purged_at says so. The row stays as a tombstone.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02 16:15:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("deleted_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("purged_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("purged_at")
        batch_op.drop_column("deleted_at")
