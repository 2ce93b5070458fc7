"""The downstream tasks a job may ask for: the catalogue the workers published, listed and checked.

The API never imports lm-eval: workers publish what they can run when they start
(``worker.catalogue``), and submissions are checked against that, so an unknown task is a 422 at
submission instead of a job that fails after its model loaded.
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy.orm import Session

from app.core.errors import Unavailable, Unprocessable
from app.repositories import eval_tasks as repo
from app.schemas import EvalTaskOut, EvalTasksOut
from lorp.spec import TaskSpec


def list_tasks(session: Session, *, source: str | None, prefix: str | None, limit: int, offset: int) -> EvalTasksOut:
    rows, total, published = repo.listed(session, source=source, prefix=prefix, limit=limit, offset=offset)
    return EvalTasksOut(
        tasks=[EvalTaskOut(name=r.name, source=r.source, metrics=list(r.metrics or [])) for r in rows],  # type: ignore[arg-type]
        total=total,
        published_at=published,
    )


def check_tasks(session: Session, tasks: Sequence[TaskSpec]) -> None:
    """Refuse tasks no worker can run, naming the entry; 503 while no worker has published yet."""
    if not tasks:
        return
    if repo.count(session) == 0:
        raise Unavailable(
            "no worker has published the downstream tasks it can run yet (a worker does when it starts, "
            "and publishes none without the 'eval' extra); try again once a worker is up, or drop evaluation.tasks",
            field="evaluation.tasks",
        )
    found = repo.known(session, (t.name for t in tasks))
    for i, task in enumerate(tasks):
        if task.name not in found:
            raise Unprocessable(
                f"unknown task {task.name!r}: the workers cannot run it (GET /v1/tasks lists those they can)",
                field=f"evaluation.tasks.{i}.name",
            )
