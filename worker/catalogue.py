"""Publishing the downstream tasks this worker can run, so the API can check ``evaluation.tasks``.

A worker publishes its catalogue (``lorp.downstream.catalogue``: lm-eval's registry, the operator's
``LORP_EVAL_TASKS_DIR`` and the built-in task) when it starts, replacing what was there: workers
share one image, and the last one to start says what they can run. A worker without lm-eval
publishes an empty catalogue, and the API then refuses jobs that ask for tasks.
"""

from __future__ import annotations

import logging
import time

from app.core.config import Settings
from app.db.session import session_factory, session_scope
from app.repositories import eval_tasks
from lorp.downstream import catalogue, missing_reason

log = logging.getLogger(__name__)


def publish_catalogue(settings: Settings) -> int:
    """Write this worker's task catalogue to the database; returns how many tasks it holds."""
    started = time.perf_counter()
    why = missing_reason()
    rows = [] if why is not None else [eval_tasks.EvalTaskRow(t.name, t.source, t.metrics) for t in catalogue()]
    with session_scope(session_factory(settings.sqlalchemy_url)) as session:
        eval_tasks.replace_catalogue(session, rows)
    if why is not None:
        log.warning("published no downstream tasks: %s", why)
    else:
        log.info("published %d downstream tasks in %.1f s", len(rows), time.perf_counter() - started)
    return len(rows)
