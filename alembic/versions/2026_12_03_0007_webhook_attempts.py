"""webhook attempts: one row per (job, attempt), and nothing of a receiver's answer but its status

webhook_deliveries gains a unique constraint on (job_id, attempt): a dispatcher claims an attempt and
writes its row in one transaction, so two senders can no longer both record "attempt 1". Rows written
before are made to fit: a job's duplicate attempt numbers are renumbered in the order they happened
(jobs.notify_attempts follows), and the errors they kept are cut to what is recorded now: "HTTP <status>"
without the receiver's body, "no HTTP answer" without the network's details.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03 10:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

deliveries = sa.table(
    "webhook_deliveries",
    sa.column("id", sa.Uuid()),
    sa.column("job_id", sa.Uuid()),
    sa.column("attempt", sa.Integer()),
    sa.column("at", sa.DateTime(timezone=True)),
    sa.column("status_code", sa.Integer()),
    sa.column("error", sa.Text()),
)
jobs = sa.table("jobs", sa.column("id", sa.Uuid()), sa.column("notify_attempts", sa.Integer()))


def _scrub_errors(bind: sa.Connection) -> None:
    has_error = deliveries.c.error.is_not(None)
    bind.execute(
        sa.update(deliveries)
        .where(has_error, deliveries.c.status_code.is_not(None))
        .values(error=sa.literal("HTTP ") + sa.cast(deliveries.c.status_code, sa.String()))
    )
    bind.execute(
        sa.update(deliveries).where(has_error, deliveries.c.status_code.is_(None)).values(error="no HTTP answer")
    )


def _renumber_duplicates(bind: sa.Connection) -> None:
    c = deliveries.c
    doubled = bind.execute(
        sa.select(c.job_id).group_by(c.job_id).having(sa.func.count() > sa.func.count(sa.distinct(c.attempt)))
    ).scalars()
    for job_id in list(doubled):
        rows = bind.execute(sa.select(c.id).where(c.job_id == job_id).order_by(c.at, c.attempt, c.id)).scalars()
        ids = list(rows)
        for number, row_id in enumerate(ids, start=1):
            bind.execute(sa.update(deliveries).where(c.id == row_id).values(attempt=number))
        bind.execute(
            sa.update(jobs)
            .where(jobs.c.id == job_id, jobs.c.notify_attempts < len(ids))
            .values(notify_attempts=len(ids))
        )


def upgrade() -> None:
    bind = op.get_bind()
    _scrub_errors(bind)
    _renumber_duplicates(bind)
    with op.batch_alter_table("webhook_deliveries", schema=None) as batch_op:
        batch_op.create_unique_constraint("uq_webhook_deliveries_job_attempt", ["job_id", "attempt"])


def downgrade() -> None:
    with op.batch_alter_table("webhook_deliveries", schema=None) as batch_op:
        batch_op.drop_constraint("uq_webhook_deliveries_job_attempt", type_="unique")
