"""The LoRP pruning engine: a plain library with no HTTP, SQL, Celery or boto imports."""
