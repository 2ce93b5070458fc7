"""task_metrics and eval_tasks: downstream task scores per job, and the tasks the workers can run

task_metrics holds lm-evaluation-harness scores of each job, dense and pruned; eval_tasks the
catalogue of tasks the workers published when they started (the API checks evaluation.tasks
against it and serves it at GET /v1/tasks).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02 05:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

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
    op.create_table(
        "eval_tasks",
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("source", sa.String(length=16), nullable=False),
        sa.Column("metrics", sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"), nullable=False),
        sa.Column("published_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_eval_tasks")),
    )


def downgrade() -> None:
    op.drop_table("eval_tasks")
    with op.batch_alter_table("task_metrics", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_task_metrics_job_id"))
    op.drop_table("task_metrics")
