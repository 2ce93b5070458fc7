"""task_metrics: downstream task scores (lm-evaluation-harness) per job, dense and pruned

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02 05:30:00
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
        "task_metrics",
        sa.Column("job_id", sa.Uuid(), nullable=False),
        sa.Column("task", sa.String(length=200), nullable=False),
        sa.Column("metric", sa.String(length=128), nullable=False),
        sa.Column("phase", sa.String(length=16), nullable=False),
        sa.Column("value", sa.Float(), nullable=True),
        sa.Column("stderr", sa.Float(), nullable=True),
        sa.Column("num_samples", sa.Integer(), nullable=False),
        sa.Column("num_fewshot", sa.Integer(), nullable=True),
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name=op.f("fk_task_metrics_job_id_jobs"), ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_task_metrics")),
        sa.UniqueConstraint("job_id", "task", "metric", "phase", name="uq_task_metrics_job_task_phase"),
    )
    with op.batch_alter_table("task_metrics", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_task_metrics_job_id"), ["job_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("task_metrics", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_task_metrics_job_id"))
    op.drop_table("task_metrics")
