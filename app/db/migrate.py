"""Run the Alembic migrations: the only way the schema is created or changed."""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def _project_root() -> Path:
    # A source checkout (editable install) has alembic/ beside app/; an installed package is run
    # from the project directory instead (the Docker images' WORKDIR holds alembic.ini).
    for candidate in (REPO_ROOT, Path.cwd()):
        if (candidate / "alembic.ini").is_file():
            return candidate
    raise FileNotFoundError("alembic.ini not found beside the package or in the working directory")


def upgrade_head(url: str) -> None:
    """``alembic upgrade head`` against ``url`` (the repository's alembic/ scripts)."""
    from alembic.config import Config

    from alembic import command

    root = _project_root()
    cfg = Config(str(root / "alembic.ini"))
    cfg.set_main_option("script_location", str(root / "alembic"))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    command.upgrade(cfg, "head")
