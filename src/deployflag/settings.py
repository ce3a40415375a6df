"""One settings object, built once from the environment and `.env`, then passed down.

Every field is read from ``DEPLOYFLAG_<FIELD>``; a few also answer to the original service's names
(``CELERY_BROKER_URL``, ``USE_DB`` …) when the new name is unset. Nothing here runs at import time.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    AliasChoices,
    ByteSize,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from deployflag import tls_settings
from deployflag.broker import nodes
from deployflag.pipeline.config import (
    DEFAULT_PARAM_GRID,
    ModelSpec,
    PipelineConfig,
    Recency,
    Scoring,
    Weights,
)
from deployflag.redaction import redact

ENV_PREFIX = "DEPLOYFLAG_"


class ConfigError(Exception):
    """A setting is missing or wrong; the message names the variable and never holds a secret."""


def _env(name: str, *legacy: str) -> AliasChoices:
    """The new variable first, then the original service's names."""
    return AliasChoices(ENV_PREFIX + name.upper(), *legacy)


def _normalise_database_url(url: str) -> str:
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise ValueError(
            "not a database URL (expected sqlite+aiosqlite:/// or postgresql+asyncpg://)"
        ) from exc
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        if parsed.database in (None, "", ":memory:"):
            # It would forget every request at exit, so a redelivered one would be trained again.
            raise ValueError("an in-memory SQLite database is not supported: give a file path")
        parsed = parsed.set(drivername="sqlite+aiosqlite")
    elif backend in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+asyncpg")
    else:
        raise ValueError(f"unsupported database {backend!r}: use SQLite or PostgreSQL")
    return parsed.render_as_string(hide_password=False)


class Settings(BaseSettings):
    """Every knob of the service. Frozen: build it once with :func:`load_settings`."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_file=".env",
        extra="ignore",
        frozen=True,
        populate_by_name=True,
    )

    # --- broker -----------------------------------------------------------------------------
    amqp_url: SecretStr = Field(
        SecretStr("amqp://guest:guest@127.0.0.1:5672/"),
        validation_alias=_env("amqp_url", "CELERY_BROKER_URL"),
        description="Broker URL, amqp:// or amqps://; for a cluster, every node's URL, "
        "comma-separated (the service fails over between them in list order).",
    )
    exchange: str = Field(
        "deployflag",
        validation_alias=_env("exchange", "AMQP_EXCHANGE_NAME"),
        description="Direct exchange every queue is bound to.",
    )
    collect_queue: str = Field("deployflag_collect_data", description="Upstream's own queue.")
    training_queue: str = Field("deployflag_training", description="Training requests.")
    result_queue: str = Field("deployflag_save_result", description="Results for the upstream.")
    failed_queue: str = Field("deployflag_failed", description="Parked requests, with reasons.")
    queue_type: Literal["classic", "quorum"] = Field(
        "classic", description="classic, or quorum for RabbitMQ clusters."
    )
    training_task_name: str = Field(
        "deployflag.contrib.ocave.tasks.process_data_from_ocave",
        description="Celery task name accepted on the training queue.",
    )
    result_task_name: str = Field(
        "contrib.deployflag.tasks.store_results_from_deployflag",
        validation_alias=_env("result_task_name", "OCAVE_TASK_NAME"),
        description="Celery task name of the upstream's result handler.",
    )
    reply_format: Literal["auto", "json", "celery"] = Field(
        "auto", description="auto answers in the envelope the request came in."
    )

    broker_connect_timeout: float = Field(
        30.0, gt=0, description="Seconds to keep trying the broker at start before exit 69."
    )

    # --- database ---------------------------------------------------------------------------
    data_dir: Path = Field(Path("data"), description="Where the default SQLite file lives.")
    database_url: SecretStr | None = Field(
        None,
        description="sqlite+aiosqlite:///PATH or postgresql+asyncpg://USER:PASS@HOST/DB "
        "(default: DATA_DIR/deployflag.db).",
    )
    auto_migrate: bool = Field(False, description="Migrate at start on PostgreSQL.")
    database_connect_timeout: float = Field(
        120.0,
        ge=0,
        description="Seconds to keep trying the database at start before exit 75.",
    )
    database_check_interval: float = Field(
        5.0, gt=0, description="Seconds between database pings for /readyz while idle."
    )
    migrations_dir: Path | None = Field(None, description="Alembic scripts (found by default).")
    # The original's database variables, used only when DEPLOYFLAG_DATABASE_URL is unset.
    use_db: Literal["sqlite3", "sqlite", "postgresql", "postgres"] | None = Field(
        None, validation_alias=AliasChoices("USE_DB"), description="Legacy: sqlite3 or postgresql."
    )
    sqlite_db_path: Path | None = Field(
        None, validation_alias=AliasChoices("SQLITE_DB_PATH"), description="Legacy SQLite path."
    )
    pg_db_name: str | None = Field(
        None,
        validation_alias=AliasChoices("PG_DEPLOY_FLAG_DB_NAME"),
        description="Legacy (USE_DB=postgresql): database name.",
    )
    pg_db_user: str | None = Field(
        None,
        validation_alias=AliasChoices("PG_DEPLOY_FLAG_DB_USER"),
        description="Legacy (USE_DB=postgresql): user.",
    )
    pg_db_password: SecretStr | None = Field(
        None,
        validation_alias=AliasChoices("PG_DEPLOY_FLAG_DB_PASSWORD"),
        description="Legacy (USE_DB=postgresql): password.",
    )
    pg_db_host: str | None = Field(
        None,
        validation_alias=AliasChoices("PG_DEPLOY_FLAG_DB_HOST"),
        description="Legacy (USE_DB=postgresql): host (default 127.0.0.1).",
    )
    pg_db_port: int | None = Field(
        None,
        validation_alias=AliasChoices("PG_DEPLOY_FLAG_DB_PORT"),
        description="Legacy (USE_DB=postgresql): port.",
    )

    # --- work -------------------------------------------------------------------------------
    workers: int = Field(
        default_factory=lambda: os.cpu_count() or 1,
        ge=1,
        le=256,
        description="Training processes (default: CPU count).",
    )
    prefetch: int | None = Field(
        None, ge=1, description="Unacked messages held (default: workers)."
    )
    burst_prefetch: int | None = Field(
        None,
        ge=0,
        description="Extra unacked messages taken while requests are short (default: 3 × "
        "workers; 0 turns the burst window off).",
    )
    burst_short_seconds: float = Field(
        0.25,
        gt=0,
        description="A request taking longer than this (or a body over 64 KiB) closes the burst "
        "window; a window's worth in a row within it opens it.",
    )
    drain_timeout: float = Field(
        60.0, gt=0, description="Seconds to finish in-flight work on stop."
    )
    job_time_limit: float = Field(
        540.0,
        gt=0,
        description="Seconds one training may take. Retries stay on one delivery: keep "
        "MAX_ATTEMPTS × this below RabbitMQ's consumer_timeout (30 min).",
    )
    max_attempts: int = Field(3, ge=1, description="Tries before a request is parked.")
    inline_job_max_bytes: ByteSize = Field(
        ByteSize(16 * 1024),
        ge=0,
        le=64 * 1024,
        description="A first delivery up to this size that arrives while nothing else is in "
        "flight is computed in the service process, not a worker (about 1 ms sooner); forecast "
        "scoring only; 0: every job in a worker.",
    )
    max_message_bytes: ByteSize = Field(
        ByteSize(64 * 1024 * 1024), gt=0, description="Largest request body accepted."
    )
    max_shortcodes: int = Field(
        20_000,
        ge=1,
        description="Most distinct shortcodes in one request (bounds the result, its reply and "
        "what the main process holds for it); more is parked as too_many_shortcodes.",
    )
    worker_memory_limit: ByteSize = Field(
        ByteSize(4 * 1024**3),
        ge=0,
        description="Address-space limit per training process (RLIMIT_AS); 0 disables it.",
    )
    retry_backoff_initial: float = Field(1.0, gt=0, description="First retry delay, seconds.")
    retry_backoff_max: float = Field(30.0, gt=0, description="Longest retry delay, seconds.")

    # --- computation ------------------------------------------------------------------------
    scoring: Scoring = Field(
        "forecast",
        description="forecast (ranks by a smoothed fix rate), or seed (the original's numbers).",
    )
    recency: Recency = Field(
        "auto",
        description="forecast: weigh recent events more? none, a half-life in days, or auto "
        "(a per-request backtest picks none or 60).",
    )
    model_weight: float = Field(
        0.0,
        ge=0,
        le=1,
        description="forecast: share of the model's fix probability in the weight (0: rate only).",
    )
    prior_strength: float = Field(
        20.0, gt=0, description="forecast: pseudo-events of the severity group's rate."
    )
    w1: float = Field(0.3, ge=0, le=1, description="seed: weight of the daily weighted fix rate.")
    w2: float = Field(
        0.3, ge=0, le=1, description="seed: weight of the historical weighted fix rate."
    )
    w3: float = Field(0.2, ge=0, le=1, description="seed: weight of the model's fix probability.")
    w4: float = Field(0.2, ge=0, le=1, description="seed: weight of the severity.")
    long_gap_days: int = Field(20, ge=0, description="days_after_last_fixed: 'Long' from here on.")
    model_estimator: Literal["HistGradientBoostingClassifier"] = Field(
        "HistGradientBoostingClassifier", description="scikit-learn estimator."
    )
    model_param_grid: dict[str, list[Any]] = Field(
        default_factory=lambda: dict(DEFAULT_PARAM_GRID), description="Grid, as JSON."
    )
    model_cv_folds: int = Field(2, ge=2, le=10, description="Cross-validation folds.")
    model_random_state: int = Field(0, description="Seed: the same request gives the same weights.")

    # --- operations -------------------------------------------------------------------------
    http_host: str = Field("127.0.0.1", description="Health and metrics endpoint address.")
    http_port: int = Field(8080, ge=0, le=65535, description="Health and metrics port (0: off).")
    http_max_connections: int = Field(
        64, ge=1, description="Open connections the health endpoint keeps; more are refused."
    )
    http_idle_timeout: float = Field(
        10.0, gt=0, description="Seconds a health-endpoint connection may stay silent."
    )
    log_format: Literal["json", "console"] = Field("json", description="json or console.")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = Field(
        "INFO", description="Log level."
    )
    loop_stall_seconds: float = Field(
        10.0, gt=0, description="/healthz fails when the event loop lags more than this."
    )
    sentry_dsn: SecretStr | None = Field(
        None,
        validation_alias=_env("sentry_dsn", "SENTRY_DSN"),
        description="Report errors to Sentry (needs the sentry extra).",
    )

    # --- TLS and secrets --------------------------------------------------------------------
    amqp_ca_file: Path | None = Field(
        None,
        description="amqps://: CA bundle the broker's certificate must chain to (default: the "
        "system's). The host name is always checked.",
    )
    amqp_cert_file: Path | None = Field(
        None, description="amqps://: client certificate (PEM; may hold the key too)."
    )
    amqp_key_file: Path | None = Field(None, description="amqps://: client certificate's key.")
    amqp_auth: Literal["plain", "external"] = Field(
        "plain",
        description="plain (user and password) or external (the client certificate; needs "
        "amqps:// and DEPLOYFLAG_AMQP_CERT_FILE).",
    )
    amqp_password: SecretStr | None = Field(
        None, description="Replaces the password in DEPLOYFLAG_AMQP_URL (for a secret file)."
    )
    database_sslmode: Literal["disable", "require", "verify-ca", "verify-full"] | None = Field(
        None,
        description="PostgreSQL TLS, as libpq: require encrypts, verify-ca checks the chain, "
        "verify-full the host name too (unset: the driver's default, which may fall back to "
        "clear).",
    )
    database_sslrootcert: Path | None = Field(
        None,
        description="PostgreSQL: CA bundle for verify-ca/verify-full (default: the system's).",
    )
    database_sslcert: Path | None = Field(None, description="PostgreSQL: client certificate.")
    database_sslkey: Path | None = Field(None, description="PostgreSQL: client certificate's key.")
    database_password: SecretStr | None = Field(
        None, description="Replaces the password in the database URL (for a secret file)."
    )
    secrets_dir: Path | None = Field(
        None,
        description="Directory of secret files, one per setting, named as its variable (default: "
        "$CREDENTIALS_DIRECTORY and /run/secrets, where they exist). Variables win over files.",
    )

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @field_validator("recency", mode="before")
    @classmethod
    def _recency(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        text = value.strip().lower()
        if text in ("auto", "none"):
            return text
        try:
            days = float(text)
        except ValueError:
            raise ValueError("must be auto, none or a half-life in days") from None
        if not (math.isfinite(days) and days > 0):
            raise ValueError("a half-life must be a positive number of days (or none)")
        return days

    @field_validator("amqp_url")
    @classmethod
    def _amqp_nodes(cls, value: SecretStr) -> SecretStr:
        nodes.check_urls(nodes.split_urls(value.get_secret_value()))
        return value

    @field_validator("sentry_dsn", "database_url", mode="before")
    @classmethod
    def _blank_is_none(cls, value: Any) -> Any:
        return None if isinstance(value, str) and value.strip() in ("", "''", '""') else value

    @model_validator(mode="after")
    def _derive(self) -> Settings:
        try:  # the pipeline's own model says what valid weights are
            Weights(w1=self.w1, w2=self.w2, w3=self.w3, w4=self.w4)
        except ValidationError as exc:
            problem = exc.errors(include_url=False)[0]["msg"].removeprefix("Value error, ")
            raise ValueError(
                f"DEPLOYFLAG_W1 + DEPLOYFLAG_W2 + DEPLOYFLAG_W3 + DEPLOYFLAG_W4: {problem}"
            ) from None
        variable = "DEPLOYFLAG_DATABASE_URL" if self.database_url else "USE_DB/SQLITE_DB_PATH/PG_*"
        url = self.database_url.get_secret_value() if self.database_url else self._legacy_db_url()
        try:
            normalised = _normalise_database_url(url)
        except ValueError as exc:
            raise ValueError(f"{variable}: {exc}") from None
        object.__setattr__(self, "database_url", SecretStr(normalised))
        return self

    @model_validator(mode="after")
    def _tls_and_secrets(self) -> Settings:
        # After _derive: the database URL is normalised by now.
        urls = nodes.split_urls(self.amqp_url.get_secret_value())
        for url in urls:
            tls_settings.check_amqp_url(url)
        if self.amqp_password is not None:
            password = self.amqp_password.get_secret_value()
            urls = [tls_settings.with_amqp_password(url, password) for url in urls]
        # One canonical form: the URLs joined by commas.
        object.__setattr__(self, "amqp_url", SecretStr(",".join(urls)))
        tls_settings.check_amqp_tls(
            urls[0], self.amqp_ca_file, self.amqp_cert_file, self.amqp_key_file, self.amqp_auth
        )
        database = self.db_url
        if self.database_password is not None:
            parsed = make_url(database)
            if parsed.get_backend_name() == "sqlite":
                raise ValueError("DEPLOYFLAG_DATABASE_PASSWORD applies to PostgreSQL only")
            database = parsed.set(
                password=self.database_password.get_secret_value()
            ).render_as_string(hide_password=False)
            object.__setattr__(self, "database_url", SecretStr(database))
        tls_settings.check_database_tls(
            database,
            self.database_sslmode,
            self.database_sslrootcert,
            self.database_sslcert,
            self.database_sslkey,
        )
        return self

    def _legacy_db_url(self) -> str:
        if self.use_db in ("postgresql", "postgres"):
            return URL.create(
                "postgresql+asyncpg",
                username=self.pg_db_user,
                password=self.pg_db_password.get_secret_value() if self.pg_db_password else None,
                host=self.pg_db_host or "127.0.0.1",
                port=self.pg_db_port,
                database=self.pg_db_name or "deployflag",
            ).render_as_string(hide_password=False)
        path = self.sqlite_db_path or (self.data_dir / "deployflag.db")
        return f"sqlite+aiosqlite:///{path}"

    # --- derived views ----------------------------------------------------------------------
    @property
    def db_url(self) -> str:
        """The database URL, secret included: hand it to SQLAlchemy, never to a log."""
        assert self.database_url is not None  # set by _derive
        return self.database_url.get_secret_value()

    @property
    def broker_urls(self) -> tuple[str, ...]:
        """Every node's URL, secret included, in the operator's order (one for a single node)."""
        return tuple(nodes.split_urls(self.amqp_url.get_secret_value()))

    @property
    def broker_url(self) -> str:
        """The first node's URL (the only one of a single broker)."""
        return self.broker_urls[0]

    @property
    def is_sqlite(self) -> bool:
        return self.db_url.startswith("sqlite")

    @property
    def effective_prefetch(self) -> int:
        return self.prefetch or self.workers

    @property
    def effective_inline_job_bytes(self) -> int:
        """``inline_job_max_bytes``, or 0 under seed scoring: its grid search can hold the loop
        for a tenth of a second even on a body of a few kB."""
        return int(self.inline_job_max_bytes) if self.scoring == "forecast" else 0

    @property
    def effective_burst_prefetch(self) -> int:
        return 3 * self.workers if self.burst_prefetch is None else self.burst_prefetch

    def pipeline_config(self) -> PipelineConfig:
        return PipelineConfig(
            scoring=self.scoring,
            recency=self.recency,
            model_weight=self.model_weight,
            prior_strength=self.prior_strength,
            weights=Weights(w1=self.w1, w2=self.w2, w3=self.w3, w4=self.w4),
            long_gap_days=self.long_gap_days,
            model=ModelSpec(
                estimator=self.model_estimator,
                param_grid=self.model_param_grid,
                cv_folds=self.model_cv_folds,
                random_state=self.model_random_state,
            ),
        )

    def describe(self) -> dict[str, Any]:
        """A loggable summary: URLs with their passwords redacted."""
        return {
            "amqp_url": nodes.describe(self.broker_urls),
            "amqp_nodes": len(self.broker_urls),
            "database_url": redact(self.db_url),
            "workers": self.workers,
            "prefetch": self.effective_prefetch,
            "burst_prefetch": self.effective_burst_prefetch,
            "queue_type": self.queue_type,
            "reply_format": self.reply_format,
            "job_time_limit": self.job_time_limit,
            "max_attempts": self.max_attempts,
            "inline_job_max_bytes": self.effective_inline_job_bytes,
            "scoring": self.scoring,
            "amqp_tls": self.broker_url.startswith("amqps://"),
            "database_sslmode": self.database_sslmode,
        }


def env_name(field: str) -> str:
    """The variable that sets ``field`` (its new name)."""
    if field.isupper():  # already a variable name (errors carry the alias that was read)
        return field
    info = Settings.model_fields.get(field)
    alias = info.validation_alias if info else None
    if isinstance(alias, AliasChoices):
        first = alias.choices[0]
        if isinstance(first, str):
            return first
    return ENV_PREFIX + field.upper()


def load_settings(**overrides: Any) -> Settings:
    """Build the settings, turning validation errors into one :class:`ConfigError` line."""
    try:
        secrets = tls_settings.secrets_dirs(os.environ)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    try:
        if secrets and "_secrets_dir" not in overrides:
            overrides["_secrets_dir"] = secrets
        return Settings(**overrides)
    except ValidationError as exc:
        problems = []
        for err in exc.errors(include_input=False, include_url=False):
            loc = err["loc"]
            message = redact(err["msg"].removeprefix("Value error, "))
            problems.append(f"{env_name(str(loc[0]))}: {message}" if loc else message)
        raise ConfigError("; ".join(problems)) from None
