"""The service side of the `lorp` CLI (migrate, keys, where serve listens) and the compose file's validity."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from fastapi.testclient import TestClient
from ports import free_port

from app.core.config import Settings
from app.main import create_app

REPO = Path(__file__).resolve().parents[2]


def lorp(args: list[str], data_dir: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORP_")}
    env["LORP_DATA_DIR"] = str(data_dir)
    return subprocess.run(
        [sys.executable, "-m", "worker.cli", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )


def test_migrate_and_key_lifecycle_against_the_api(tmp_path):
    data = tmp_path / "data"
    migrated = lorp(["migrate"], data)
    assert migrated.returncode == 0, migrated.stderr
    assert (data / "lorp.db").is_file()

    created = lorp(["keys", "create", "--name", "ci-admin", "--admin"], data)
    assert created.returncode == 0, created.stderr
    key = re.search(r"^key\s+(\S+)$", created.stdout, re.M).group(1)
    key_id = re.search(r"^id\s+(\S+)$", created.stdout, re.M).group(1)
    assert key.startswith("lorp_")
    listed = lorp(["keys", "list"], data)
    assert key_id in listed.stdout and "ci-admin" in listed.stdout
    assert key not in listed.stdout  # the secret is shown once, never listed
    assert key not in (data / "lorp.db").read_bytes().decode("latin-1")  # stored hashed

    settings = Settings(data_dir=data, auth_required=True)
    client = TestClient(create_app(settings))
    assert client.get("/v1/jobs").status_code == 401
    assert client.get("/v1/jobs", headers={"Authorization": f"Bearer {key}"}).status_code == 200

    revoked = lorp(["keys", "revoke", key_id], data)
    assert revoked.returncode == 0, revoked.stderr
    assert client.get("/v1/jobs", headers={"Authorization": f"Bearer {key}"}).status_code == 401
    again = lorp(["keys", "revoke", key_id], data)
    assert again.returncode == 2 and "[key_id]" in again.stderr


def test_compose_file_is_valid_and_runs_real_commands():
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"api", "worker", "reconciler", "postgres", "redis", "minio", "minio-bucket", "migrate", "flower"} <= set(
        services
    )
    assert services["api"]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert services["migrate"]["command"] == ["alembic", "upgrade", "head"]
    assert services["worker"]["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    from worker.cli import build_parser

    parser = build_parser()
    for name in ("worker", "reconciler"):
        parser.parse_args(services[name]["command"])  # the worker image's entry point is `lorp`
    for dockerfile in ("api.Dockerfile", "worker.Dockerfile"):
        assert (REPO / "docker" / dockerfile).is_file()
    tool = shutil.which("docker-compose")
    if tool is None:
        pytest.skip("docker-compose is not installed; the structure above was checked")
    example = dict(
        line.split("=", 1) for line in (REPO / "docker" / "compose.env.example").read_text().splitlines() if "=" in line
    )
    result = subprocess.run(
        [tool, "config", "-q"], cwd=REPO, capture_output=True, text=True, timeout=60, env={**os.environ, **example}
    )
    assert result.returncode == 0, result.stderr


def test_compose_runs_production_with_no_secret_in_the_file():
    text = (REPO / "docker-compose.yml").read_text()
    compose = yaml.safe_load(text)
    assert compose["x-lorp-env"]["LORP_ENV"] == "production"
    # Every credential is a required substitution (${NAME:?why}), never a literal value.
    for service in compose["services"].values():
        for name, value in (service.get("environment") or {}).items():
            if re.search(r"PASSWORD|SECRET|ACCESS_KEY", name):
                assert re.fullmatch(r"\$\{[A-Z_]+:\?[^}]+\}", str(value)), (name, value)
    env = compose["x-lorp-env"]
    assert re.fullmatch(r"\$\{[A-Z_]+:\?[^}]+\}", env["LORP_S3_SECRET_KEY"])
    assert ":${POSTGRES_PASSWORD:?" in env["LORP_DATABASE_URL"]
    for secret in ("lorp-secret-key", "lorp:lorp@"):
        assert secret not in text
    example = (REPO / "docker" / "compose.env.example").read_text()
    for name in ("POSTGRES_PASSWORD", "MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD"):
        assert f"{name}=" in example and "${" + name + ":?" in text


def test_an_unknown_lorp_env_is_an_error(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORP_")}
    env.update(LORP_DATA_DIR=str(tmp_path / "data"), LORP_ENV="prod")
    result = subprocess.run(
        [sys.executable, "-m", "worker.cli", "migrate"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert "env:" in result.stderr and "'development' or 'production'" in result.stderr, result.stderr
    assert not (tmp_path / "data" / "lorp.db").exists()


def test_serve_listens_where_the_settings_say_and_its_flags_win(tmp_path):
    """`lorp serve` takes its address from LORP_HOST and LORP_PORT like every other setting (its flags
    used to shadow them with their own defaults), and --port still wins over LORP_PORT."""
    from_env, flag = free_port(), free_port()

    def serve(extra: list[str], data: Path) -> str:
        """Where a `lorp serve` with LORP_PORT=from_env and ``extra`` flags answers."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("LORP_")}
        env.update(LORP_DATA_DIR=str(data), LORP_PORT=str(from_env), LORP_HOST="127.0.0.1")
        proc = subprocess.Popen(
            [sys.executable, "-m", "worker.cli", "serve", "--no-worker", *extra],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and proc.poll() is None:
                for candidate in (from_env, flag):
                    try:
                        if httpx.get(f"http://127.0.0.1:{candidate}/healthz", timeout=1).status_code == 200:
                            return f"127.0.0.1:{candidate}"
                    except httpx.HTTPError:
                        pass
                time.sleep(0.2)
            return "nowhere"
        finally:
            proc.send_signal(signal.SIGINT)
            output = proc.communicate(timeout=30)[0]
            assert proc.returncode == 0, output

    assert serve([], tmp_path / "a") == f"127.0.0.1:{from_env}"
    assert serve(["--port", str(flag)], tmp_path / "b") == f"127.0.0.1:{flag}"


def test_every_setting_is_in_the_readme_s_table() -> None:
    """Each field of Settings is an environment variable an operator may set: the README's Settings
    table names every one (a new setting is documented where people look for it)."""
    readme = (REPO / "README.md").read_text()
    table = readme.split("## Settings", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in table.splitlines() if line.startswith("| `LORP_")]
    named = {name for row in rows for name in re.findall(r"`(LORP_[A-Z0-9_]+)`", row.split(" | ")[0])}
    assert Settings.model_config["env_prefix"] == "LORP_"
    missing = sorted(f"LORP_{field.upper()}" for field in Settings.model_fields if f"LORP_{field.upper()}" not in named)
    assert not missing, f"not in README.md's Settings table: {missing}"
