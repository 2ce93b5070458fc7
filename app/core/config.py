"""Service settings: one pydantic-settings object, environment prefix ``LORP_``.

The defaults are the embedded mode (no servers): SQLite, kombu's SQLAlchemy transport over SQLite as
the broker, artifacts in a local folder, all under ``LORP_DATA_DIR``. Production sets the URLs of
Postgres, Redis and S3/MinIO instead.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal, TypedDict

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from app.core.s3ref import S3Location, parse_s3_location
from app.core.webhook_policy import parse_allowed_host, parse_networks

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


class S3Options(TypedDict):
    """The S3 connection settings, as ``app.storage.S3Storage`` takes them."""

    endpoint_url: str | None
    region: str
    access_key: str | None
    secret_key: str | None


class Settings(BaseSettings):
    """Every setting, with its default; see the README's settings table."""

    model_config = SettingsConfigDict(env_prefix="LORP_", extra="ignore")

    # A closed set: a typo ("prod") is an error at start-up, not a silent development mode.
    env: Literal["development", "production"] = Field(default="development", description="development | production")
    data_dir: Path = Field(default=Path("var"), description="embedded mode: database, broker, artifacts, work")
    database_url: str | None = Field(default=None, description="default: sqlite under data_dir")
    broker_url: str | None = Field(default=None, description="default: kombu sqlalchemy transport under data_dir")
    storage_url: str | None = Field(default=None, description="file:///dir or s3://bucket/prefix")
    scratch_dir: Path | None = Field(
        default=None,
        description="where a sequential job keeps its states between attempts, so a retry resumes "
        "(default data_dir/scratch; a volume shared by the workers lets a retry on another machine resume)",
    )
    s3_endpoint_url: str | None = None
    s3_region: str = "us-east-1"
    s3_access_key: str | None = None
    s3_secret_key: str | None = None
    presign_expires_s: int = Field(default=3600, ge=60, le=7 * 24 * 3600)

    auth_required: bool = Field(default=False, description="require Bearer API keys (always on off loopback)")
    host: str = "127.0.0.1"
    port: int = 8000

    model_roots: list[Path] = Field(
        default_factory=list, description="directories local model paths must resolve into (besides the cache)"
    )
    allow_hub_models: bool = True
    trust_remote_code_models: list[str] = Field(
        default_factory=list, description="model ids an operator allows to run their own code"
    )

    # What a caller may name (s3:// models), and how many jobs one key may hold.
    model_s3_prefixes: list[str] = Field(
        default_factory=list,
        description='s3:// folders models may be read from ("s3://bucket/models/"); none: s3:// models off',
    )
    model_s3_max_objects: int = Field(default=2000, ge=1, description="an s3:// model holding more objects is refused")
    model_s3_max_bytes: int = Field(
        default=512 * 1024**3, ge=1, description="an s3:// model larger than this (bytes) is refused before copying"
    )
    key_max_queued_jobs: int = Field(
        default=100, ge=1, description="queued jobs one API key may hold (429 beyond); admin keys and no-auth exempt"
    )
    key_max_running_jobs: int = Field(
        default=4, ge=1, description="jobs of one API key running at once; more wait queued (admin, no-auth exempt)"
    )

    @field_validator("model_s3_prefixes")
    @classmethod
    def _model_s3_prefixes_parse(cls, entries: list[str]) -> list[str]:
        for entry in entries:
            try:
                parse_s3_location(entry)
            except ValueError as exc:
                raise ValueError(f"LORP_MODEL_S3_PREFIXES: {exc}") from None
        return entries

    max_upload_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)
    max_body_bytes: int = Field(default=1024 * 1024, ge=1024)

    job_time_limit_s: int = Field(default=6 * 3600, ge=10)
    job_hard_limit_grace_s: int = Field(
        default=60,
        ge=1,
        description=(
            "how long after LORP_JOB_TIME_LIMIT_S a job that has not stopped has its process killed (the "
            "hard limit); the job then fails with time_limit_exceeded"
        ),
    )
    heartbeat_interval_s: float = Field(default=15.0, gt=0)
    heartbeat_timeout_s: float = Field(default=180.0, gt=0)
    queued_timeout_s: float = Field(
        default=900.0,
        gt=0,
        description=(
            "re-enqueue a queued job whose message is older than this and presumed lost (its queue idle with a "
            "free slot, or a message sent after it taken first)"
        ),
    )
    queue_quiet_s: float = Field(
        default=30.0,
        gt=0,
        description=(
            "a queue whose free job slot took nothing for this long counts as idle: a message older than "
            "queued_timeout_s waiting on it is presumed lost"
        ),
    )
    stall_timeout_s: float = Field(
        default=1800.0,
        gt=0,
        description="take back a running job whose progress has not moved for this long (its heartbeat alive)",
    )
    outage_wait_s: float = Field(
        default=300.0,
        ge=0,
        description=(
            "how long a job waits for object storage that fails, retrying with backoff, before it fails with "
            "storage_unavailable: a store away for a minute does not throw away the job's work"
        ),
    )
    job_start_timeout_s: float = Field(
        default=60.0,
        gt=0,
        description="a pool child that took a job and has not started it after this long is killed; the job goes back",
    )
    reconcile_interval_s: float = Field(default=30.0, gt=0)
    max_attempts: int = Field(default=3, ge=1, le=20)
    progress_min_interval_s: float = Field(default=1.0, ge=0)
    queue_name: str = "gpu"
    worker_beat_interval_s: float = Field(default=15.0, gt=0, description="how often a worker records it is alive")
    worker_timeout_s: float = Field(
        default=60.0, gt=0, description="a worker whose last beat is older than this is no longer counted live"
    )
    webhook_allowed_hosts: list[str] = Field(
        default_factory=list,
        description=(
            'hosts (and ports) a job\'s notify.url may name: "host" (the scheme\'s default port), "host:8443", '
            '"host:*", "*.example.com" for subdomains; none: off'
        ),
    )
    webhook_allowed_networks: list[str] = Field(
        default_factory=list,
        description="internal networks (CIDR) webhooks may reach; loopback, private, link-local ... are refused",
    )
    webhook_max_attempts: int = Field(default=8, ge=1, le=50, description="deliveries of one webhook before giving up")
    webhook_timeout_s: float = Field(
        default=10.0, gt=0, le=120, description="a delivery attempt's whole limit: connect, send, status line"
    )
    webhook_retry_base_s: float = Field(default=30.0, ge=0, description="the wait after a failed delivery, doubling")
    webhook_concurrency: int = Field(default=8, ge=1, le=256, description="deliveries in flight per dispatcher")
    webhook_poll_interval_s: float = Field(
        default=1.0, gt=0, le=60, description="how often the dispatcher looks for deliveries that are due"
    )

    @field_validator("webhook_allowed_hosts")
    @classmethod
    def _webhook_hosts_parse(cls, entries: list[str]) -> list[str]:
        for entry in entries:
            parse_allowed_host(entry)  # a ValueError naming the entry
        return entries

    @field_validator("webhook_allowed_networks")
    @classmethod
    def _webhook_networks_parse(cls, entries: list[str]) -> list[str]:
        try:
            parse_networks(entries)
        except ValueError as exc:
            raise ValueError(f"LORP_WEBHOOK_ALLOWED_NETWORKS: {exc}") from None
        return entries

    artifact_ttl_days: float | None = Field(
        default=None, gt=0, description="the reconciler deletes finished jobs (files and results) this long after"
    )
    worker_restart_limit: int = Field(
        default=5, ge=1, le=100, description="lorp serve: quick worker deaths in a row before it stops restarting"
    )

    # Full disks.
    min_free_disk_mb: int = Field(
        default=100,
        ge=0,
        description="/readyz fails when a folder the service writes has less free space (MiB); 0: off",
    )

    @model_validator(mode="after")
    def _worker_timeout_covers_beats(self) -> Settings:
        if self.worker_timeout_s <= self.worker_beat_interval_s:
            raise ValueError(
                f"LORP_WORKER_TIMEOUT_S ({self.worker_timeout_s:g}) must be longer than "
                f"LORP_WORKER_BEAT_INTERVAL_S ({self.worker_beat_interval_s:g}), or live workers look dead"
            )
        return self

    @model_validator(mode="after")
    def _stall_timeout_covers_storage_waits(self) -> Settings:
        if self.outage_wait_s >= self.stall_timeout_s:
            raise ValueError(
                f"LORP_OUTAGE_WAIT_S ({self.outage_wait_s:g}) must be shorter than LORP_STALL_TIMEOUT_S "
                f"({self.stall_timeout_s:g}), or a job waiting for storage is taken back as stalled"
            )
        return self

    @model_validator(mode="after")
    def _production_needs_servers(self) -> Settings:
        if self.env == "production":
            missing = [name for name in ("database_url", "broker_url", "storage_url") if getattr(self, name) is None]
            if missing:
                raise ValueError(f"production needs explicit {', '.join('LORP_' + m.upper() for m in missing)}")
            if not self.auth_required:
                raise ValueError("production requires LORP_AUTH_REQUIRED=true")
        return self

    @property
    def resolved_data_dir(self) -> Path:
        return self.data_dir.expanduser().resolve()

    @property
    def sqlalchemy_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{self.resolved_data_dir / 'lorp.db'}"

    @property
    def celery_broker_url(self) -> str:
        if self.broker_url:
            return self.broker_url
        return f"sqla+sqlite:///{self.resolved_data_dir / 'broker.db'}"

    @property
    def artifact_storage_url(self) -> str:
        if self.storage_url:
            return self.storage_url
        return (self.resolved_data_dir / "artifacts").as_uri()

    @property
    def model_s3_folders(self) -> list[S3Location]:
        """``LORP_MODEL_S3_PREFIXES`` as folders (each checked when the settings were read)."""
        return [parse_s3_location(entry) for entry in self.model_s3_prefixes]

    def s3_options(self) -> S3Options:
        """The S3 connection settings, as ``storage_from_url`` takes them."""
        return {
            "endpoint_url": self.s3_endpoint_url,
            "region": self.s3_region,
            "access_key": self.s3_access_key,
            "secret_key": self.s3_secret_key,
        }

    @property
    def work_dir(self) -> Path:
        return self.resolved_data_dir / "work"

    @property
    def job_scratch_root(self) -> Path:
        """The folder of the jobs' scratch (kept across a job's attempts, removed when it ends)."""
        return self.scratch_dir.expanduser().resolve() if self.scratch_dir else self.resolved_data_dir / "scratch"

    @property
    def embedded(self) -> bool:
        return self.database_url is None or self.database_url.startswith("sqlite")

    def auth_enabled(self, host: str | None = None) -> bool:
        """Keys are required when asked for, and always when listening beyond loopback."""
        return self.auth_required or (host or self.host) not in LOOPBACK_HOSTS


@lru_cache
def get_settings() -> Settings:
    return Settings()
