"""Installing the project: the build backend reads pyproject.toml without deprecation warnings."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit  # no server: it belongs with the service code it checks, not its suite

REPO = Path(__file__).resolve().parents[2]


def test_installing_the_project_warns_of_nothing() -> None:
    # What scripts/setup.sh runs (pip install -e .), up to the backend's metadata step, without the
    # network: the backend's warnings land in this output exactly as they would in the setup log.
    argv = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "--no-deps"]
    argv += ["--no-build-isolation", "--no-index", "--dry-run", "-v", "-e", str(REPO)]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=REPO, check=False)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log
    assert "Would install lorp-service" in log
    # The machine's own pip configuration may add "WARNING: Location ... is ignored" lines; the
    # project must add none of its own.
    own = [line for line in log.splitlines() if "Location 'file:" not in line]
    noisy = [line for line in own if "deprecat" in line.lower() or "Warning" in line]
    assert not noisy, "\n".join(noisy)


def test_the_client_package_stands_alone() -> None:
    """client/ installs on its own (httpx and pydantic only) and importing it loads nothing of the server."""
    import tomllib

    project = tomllib.loads((REPO / "client" / "pyproject.toml").read_text())["project"]
    assert sorted(d.split(">")[0] for d in project["dependencies"]) == ["httpx", "pydantic"]
    argv = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "--no-deps"]
    argv += ["--no-build-isolation", "--no-index", "--dry-run", str(REPO / "client")]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=REPO, check=False)
    assert result.returncode == 0 and "Would install lorp-client" in result.stdout, result.stdout + result.stderr
    probe = (
        "import sys, lorp_client, lorp_client.aio; "
        "heavy = sorted({'torch', 'transformers', 'fastapi', 'sqlalchemy', 'celery', 'app', 'lorp', 'worker'} "
        "& set(sys.modules)); print(heavy); sys.exit(1 if heavy else 0)"
    )
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=False)
    assert loaded.returncode == 0, loaded.stdout + loaded.stderr
