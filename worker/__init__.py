"""The worker process of the LoRP service: the Celery app and task, the job runner, the reconciler,
and the service's commands (``lorp serve|worker|reconciler|migrate|keys``)."""
