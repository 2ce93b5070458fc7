"""unique Idempotency-Key among anonymous jobs

The (owner_id, idempotency_key) constraint treats NULL owners as distinct, so it does not stop two
anonymous jobs with one key; a partial unique index does (Postgres and SQLite both support them).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28 14:10:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

WHERE = sa.text("owner_id IS NULL AND idempotency_key IS NOT NULL")


def upgrade() -> None:
    op.create_index(
        "uq_jobs_anonymous_idempotency",
        "jobs",
        ["idempotency_key"],
        unique=True,
        postgresql_where=WHERE,
        sqlite_where=WHERE,
    )


def downgrade() -> None:
    op.drop_index("uq_jobs_anonymous_idempotency", table_name="jobs")
