"""Installing the project: the build backend reads pyproject.toml without deprecation warnings, and
setup and the images install the exact versions constraints.txt pins (scripts/lock.sh)."""

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


def _lock() -> tuple[dict[str, str], set[str]]:
    """constraints.txt's pins, and the packages its header says it leaves out (scripts/lock.sh)."""
    from packaging.utils import canonicalize_name

    pins, unpinned = {}, set()
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line.startswith("# Not pinned:"):
            unpinned = {canonicalize_name(n) for n in line.split(":", 1)[1].split()}
        elif line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version.strip()
    return pins, unpinned


def test_every_package_installed_is_the_one_the_lock_pins_and_within_the_project_s_ranges() -> None:
    # scripts/setup.sh installs through constraints.txt: what runs the tests is what the lock says, and
    # the lock satisfies every range the project, the client and the API image ask for.
    import importlib.metadata as metadata
    import tomllib

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pins, unpinned = _lock()
    assert {"torch", "lorp-service", "lorp-client"} <= unpinned  # torch's build is TORCH_SPEC's; ours are editable
    installed = {canonicalize_name(d.metadata["Name"]): d.version for d in metadata.distributions()}
    stray = {n: v for n, v in installed.items() if n not in unpinned and pins.get(n) != v}
    assert not stray, f"installed but not as constraints.txt pins them (make lock, then make test): {stray}"
    assert not set(pins) & unpinned and set(pins) <= set(installed)

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    client = tomllib.loads((REPO / "client" / "pyproject.toml").read_text())["project"]
    api = [line for line in (REPO / "docker" / "api-requirements.txt").read_text().splitlines() if line[:1].isalpha()]
    wanted = [*project["dependencies"], *client["dependencies"], *api]
    wanted += [r for extra in ("dev", "eval") for r in project["optional-dependencies"][extra]]
    for requirement in map(Requirement, wanted):
        name = canonicalize_name(requirement.name)
        if name not in unpinned:
            assert requirement.specifier.contains(pins[name], prereleases=True), (str(requirement), pins[name])


def test_setup_and_both_images_install_through_the_lock() -> None:
    setup = (REPO / "scripts" / "setup.sh").read_text()
    assert "LOCK=(-c constraints.txt)" in setup
    assert "LOCK_OFF=1 bash scripts/setup.sh" in (REPO / "scripts" / "lock.sh").read_text()  # the lock's own resolve
    installs = [line for line in setup.splitlines() if '"${PIP[@]}" install' in line and "--upgrade pip" not in line]
    project = [line for line in installs if "$TORCH_SPEC" not in line and "--no-deps" not in line]
    assert len(project) == 2 and all('"${LOCK[@]}"' in line for line in project), installs  # the client, the project
    stamp = (REPO / "Makefile").read_text().split("bash scripts/setup.sh")[0]
    assert "constraints.txt" in stamp  # a new lock runs setup again
    for image in ("api.Dockerfile", "worker.Dockerfile"):
        text = (REPO / "docker" / image).read_text()
        installs = [part.split("&&")[0] for part in text.split("pip install")[1:]]
        resolved = [part for part in installs if "--no-deps" not in part]
        assert "constraints.txt" in text.split("RUN")[0], image  # copied in
        assert resolved and all("-c constraints.txt" in part for part in resolved), (image, installs)
