"""Worker side of the LoRP service: the pruning engine (``worker.engine``) and, later, Celery tasks."""
