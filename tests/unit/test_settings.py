"""Settings: DEPLOYFLAG_* names, the original's names, validation that names the variable."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from deployflag.settings import ConfigError, load_settings

LEGACY = (
    "CELERY_BROKER_URL",
    "AMQP_EXCHANGE_NAME",
    "OCAVE_TASK_NAME",
    "SENTRY_DSN",
    "USE_DB",
    "SQLITE_DB_PATH",
    "PG_DEPLOY_FLAG_DB_NAME",
    "PG_DEPLOY_FLAG_DB_USER",
    "PG_DEPLOY_FLAG_DB_PASSWORD",
    "PG_DEPLOY_FLAG_DB_HOST",
    "PG_DEPLOY_FLAG_DB_PORT",
)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in list(os.environ):
        if name.startswith("DEPLOYFLAG_") or name in LEGACY:
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)  # no stray .env


def test_defaults_follow_the_spec() -> None:
    s = load_settings()
    assert s.broker_url == "amqp://guest:guest@127.0.0.1:5672/"
    assert s.db_url == "sqlite+aiosqlite:///data/deployflag.db"
    assert (s.exchange, s.queue_type, s.reply_format) == ("deployflag", "classic", "auto")
    assert s.training_queue == "deployflag_training"
    assert s.result_queue == "deployflag_save_result"
    assert s.failed_queue == "deployflag_failed"
    assert s.collect_queue == "deployflag_collect_data"
    assert s.effective_prefetch == s.workers
    assert s.effective_burst_prefetch == 3 * s.workers
    assert s.burst_short_seconds == 0.25
    assert s.drain_timeout == 60
    assert s.job_time_limit < 30 * 60, "below RabbitMQ's default consumer_timeout"
    assert s.max_attempts == 3
    assert (s.http_host, s.http_port) == ("127.0.0.1", 8080)
    assert (s.log_format, s.log_level) == ("json", "INFO")
    assert s.auto_migrate is False
    assert (s.w1, s.w2, s.w3, s.w4) == (0.3, 0.3, 0.2, 0.2)


def test_the_burst_window_follows_the_workers_unless_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEPLOYFLAG_WORKERS", "4")
    assert load_settings().effective_burst_prefetch == 12
    monkeypatch.setenv("DEPLOYFLAG_BURST_PREFETCH", "0")  # off
    s = load_settings()
    assert s.effective_burst_prefetch == 0
    assert s.describe()["burst_prefetch"] == 0
    monkeypatch.setenv("DEPLOYFLAG_BURST_PREFETCH", "-1")
    with pytest.raises(ConfigError, match="DEPLOYFLAG_BURST_PREFETCH"):
        load_settings()
    monkeypatch.setenv("DEPLOYFLAG_BURST_PREFETCH", "5")
    monkeypatch.setenv("DEPLOYFLAG_BURST_SHORT_SECONDS", "0")
    with pytest.raises(ConfigError, match="DEPLOYFLAG_BURST_SHORT_SECONDS"):
        load_settings()


def test_new_names_win_over_the_originals(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CELERY_BROKER_URL", "amqp://old:pw@old-host//")
    monkeypatch.setenv("DEPLOYFLAG_AMQP_URL", "amqp://new:pw@new-host/")
    monkeypatch.setenv("AMQP_EXCHANGE_NAME", "legacy-exchange")
    s = load_settings()
    assert s.broker_url == "amqp://new:pw@new-host/"
    assert s.exchange == "legacy-exchange"


def test_original_names_still_work(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CELERY_BROKER_URL", "amqp://u:secret@rabbit:5672//")
    monkeypatch.setenv("OCAVE_TASK_NAME", "contrib.x.store")
    monkeypatch.setenv("USE_DB", "postgresql")
    monkeypatch.setenv("PG_DEPLOY_FLAG_DB_NAME", "flags")
    monkeypatch.setenv("PG_DEPLOY_FLAG_DB_USER", "df")
    monkeypatch.setenv("PG_DEPLOY_FLAG_DB_PASSWORD", "p@ss")
    monkeypatch.setenv("PG_DEPLOY_FLAG_DB_HOST", "db")
    monkeypatch.setenv("PG_DEPLOY_FLAG_DB_PORT", "5433")
    s = load_settings()
    assert s.broker_url == "amqp://u:secret@rabbit:5672//"
    assert s.result_task_name == "contrib.x.store"
    assert s.db_url == "postgresql+asyncpg://df:p%40ss@db:5433/flags"
    described = str(s.describe())
    assert "df:***@db" in described
    assert "p%40ss" not in described
    assert "secret" not in described


def test_legacy_sqlite_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("USE_DB", "sqlite3")
    monkeypatch.setenv("SQLITE_DB_PATH", "dev/sqlite3/deployflag.db")
    assert load_settings().db_url == "sqlite+aiosqlite:///dev/sqlite3/deployflag.db"


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgresql://u:p@h/db", "postgresql+asyncpg://u:p@h/db"),
        ("postgres://u:p@h/db", "postgresql+asyncpg://u:p@h/db"),
        ("sqlite:///x.db", "sqlite+aiosqlite:///x.db"),
    ],
)
def test_database_urls_are_normalised_to_async_drivers(
    monkeypatch: pytest.MonkeyPatch, url: str, expected: str
) -> None:
    monkeypatch.setenv("DEPLOYFLAG_DATABASE_URL", url)
    assert load_settings().db_url == expected


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("DEPLOYFLAG_WORKERS", "many", "DEPLOYFLAG_WORKERS"),
        ("DEPLOYFLAG_WORKERS", "0", "DEPLOYFLAG_WORKERS"),
        ("DEPLOYFLAG_AMQP_URL", "http://u:hunter2@h/", "DEPLOYFLAG_AMQP_URL"),
        ("DEPLOYFLAG_DATABASE_URL", "mysql://u:hunter2@h/db", "DEPLOYFLAG_DATABASE_URL"),
        ("DEPLOYFLAG_DATABASE_URL", "::not a url::", "DEPLOYFLAG_DATABASE_URL"),
        ("DEPLOYFLAG_DATABASE_URL", "sqlite+aiosqlite:///:memory:", "in-memory SQLite"),
        ("DEPLOYFLAG_DATABASE_URL", "sqlite://", "in-memory SQLite"),
        ("DEPLOYFLAG_QUEUE_TYPE", "stream", "DEPLOYFLAG_QUEUE_TYPE"),
        ("DEPLOYFLAG_REPLY_FORMAT", "xml", "DEPLOYFLAG_REPLY_FORMAT"),
        ("DEPLOYFLAG_W1", "0.5", "DEPLOYFLAG_W1"),
        ("DEPLOYFLAG_MAX_MESSAGE_BYTES", "lots", "DEPLOYFLAG_MAX_MESSAGE_BYTES"),
        ("CELERY_BROKER_URL", "redis://h", "DEPLOYFLAG_AMQP_URL"),
    ],
)
def test_a_bad_value_names_the_variable_and_hides_secrets(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, message: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert message in str(caught.value)
    assert "hunter2" not in str(caught.value)


def test_weights_must_sum_to_one(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {"W1": "0.25", "W2": "0.25", "W3": "0.25", "W4": "0.25"}.items():
        monkeypatch.setenv(f"DEPLOYFLAG_{name}", value)
    config = load_settings().pipeline_config()
    assert config.weights.w1 == 0.25


def test_dotenv_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / ".env").write_text("DEPLOYFLAG_WORKERS=7\nDEPLOYFLAG_LOG_LEVEL=debug\n")
    s = load_settings()
    assert (s.workers, s.log_level) == (7, "DEBUG")


def test_sizes_accept_units(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEPLOYFLAG_MAX_MESSAGE_BYTES", "1MiB")
    monkeypatch.setenv("DEPLOYFLAG_WORKER_MEMORY_LIMIT", "0")
    s = load_settings()
    assert (int(s.max_message_bytes), int(s.worker_memory_limit)) == (1024 * 1024, 0)
