"""Process settings, read from AUDIENCE_SYNC_* environment variables at the edges."""

from functools import lru_cache
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="AUDIENCE_SYNC_", extra="ignore")

    database_url: str = "sqlite:///./audience_sync.db"
    redis_url: str = "redis://localhost:6379/0"
    # The Celery broker (e.g. amqp://user:password@rabbitmq:5672//); default: the Redis URL.
    # Results and the shared rate limiter stay in Redis whatever the broker.
    broker_url: str | None = None

    # Snapshots kept per audience; older ones are pruned after each run.
    snapshots_kept: int = Field(default=3, ge=2)
    # Days the membership log keeps a user's past membership periods (who entered and
    # exited in which snapshot); older periods are pruned after each run.
    membership_log_retention_days: int = Field(default=90, ge=1)
    # Rejections in a row after which a user is quarantined (skipped until retried by hand).
    quarantine_after: int = Field(default=5, ge=1)
    # Transient HTTP failures: attempts per request and exponential backoff bounds.
    max_attempts: int = Field(default=5, ge=1)
    backoff_base_seconds: float = Field(default=0.5, ge=0)
    backoff_max_seconds: float = Field(default=30.0, ge=0)
    connect_timeout_seconds: float = Field(default=5.0, gt=0)
    read_timeout_seconds: float = Field(default=30.0, gt=0)
    # A run's lock expires this long after its last heartbeat (a killed worker frees it).
    lock_ttl_seconds: int = Field(default=300, ge=5)
    # Rows read from a source per fetch, and rows written to a snapshot per statement.
    source_fetch_size: int = Field(default=10_000, ge=1)
    # Changes per Celery delivery chunk when a run fans out across workers.
    chunk_size: int = Field(default=20_000, ge=1)
    # The Celery queue every task goes to (deployments sharing one Redis use different ones).
    celery_queue: str = Field(default="audience_sync", min_length=1)
    # A sync whose run failed (or a chunk whose destination stayed down) is tried again by its
    # task this many times, after this delay, doubled at each attempt.
    task_retries: int = Field(default=3, ge=0)
    task_retry_delay_seconds: float = Field(default=60.0, ge=0)
    # Pages of changes delivery keeps in flight at once to one destination. Unset: chosen
    # from the destination's rate limit and the measured latency of its answers
    # (`worker.ratelimit.requests_in_flight`), at most `delivery_max_in_flight`.
    delivery_in_flight: int | None = Field(default=None, ge=1)
    delivery_max_in_flight: int = Field(default=16, ge=1)
    # The console's address as users reach it; alerts link to its pages when set.
    public_url: str | None = None
    # Required (as a bearer token or the login form) when the console listens beyond this
    # host.
    console_token: SecretStr | None = None
    # `json`: one JSON object per log line, with the run's id, audience and destination.
    log_format: Literal["text", "json"] = "text"
    # Test hook: stop the process (SIGKILL) when the sync reaches this named step.
    crash_at: str | None = None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
