# API image: FastAPI + SQLAlchemy + a producer-only Celery client, no torch and no worker code: the API
# imports only the engine's torch-free modules (lorp.spec, lorp.selection, lorp.errors, lorp.depth).
FROM python:3.11-slim
WORKDIR /srv/lorp
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
COPY pyproject.toml README.md alembic.ini ./
COPY app ./app
COPY lorp ./lorp
COPY alembic ./alembic
COPY client ./client
COPY docker/api-requirements.txt constraints.txt ./
# The project's own dependency list includes torch for the worker; the API installs its subset, at
# the versions constraints.txt pins. The wire models live in the client package (lorp_client), which
# the API serves from.
RUN pip install --no-cache-dir -c constraints.txt -r api-requirements.txt && pip install --no-cache-dir --no-deps ./client .
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --retries=5 CMD python -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)" || exit 1
CMD ["uvicorn", "app.main:app", "--host", "0.0.0.0", "--port", "8000", "--proxy-headers"]
