"""The command line as people use it: a subprocess, its exit code, stdout and one-line errors."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest

from deployflag import exitcodes
from tests.support.broker import ServiceProcess
from tests.support.postgres import PostgresCluster
from tests.support.toolkit import free_port

ROOT = Path(__file__).resolve().parents[2]
WORKED = ROOT / "examples" / "worked-example.json"


def deployflag(
    *args: str, env: dict[str, str] | None = None, stdin: bytes | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[bytes]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("DEPLOYFLAG_")}
    return subprocess.run(
        [sys.executable, "-m", "deployflag", *args],
        env={**base, **(env or {})},
        input=stdin,
        capture_output=True,
        timeout=timeout,
        check=False,
    )


def one_line_error(done: subprocess.CompletedProcess[bytes]) -> str:
    err = done.stderr.decode()
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]


def sqlite_env(tmp_path: Path) -> dict[str, str]:
    return {"DEPLOYFLAG_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'df.db'}"}


@pytest.mark.parametrize(
    "command",
    ["", "serve", "run", "submit", "migrate", "healthcheck", "generate", "requests", "failed"],
)
def test_help(command: str) -> None:
    done = deployflag(*([command] if command else []), "--help")
    assert done.returncode == 0
    assert b"usage: deployflag" in done.stdout
    assert b"78 configuration error" in done.stdout


def test_run_prints_the_weights_of_the_worked_example() -> None:
    done = deployflag("run", str(WORKED))
    assert done.returncode == 0, done.stderr
    result = orjson.loads(done.stdout)
    # Forecast scoring by default (docs/scoring.md works the example through)
    assert result["scoring"] == "forecast"
    assert result["scores"][0]["issue_weight"] == 95
    assert result["request_id"]  # the SHA-256 of the body by default


def test_run_with_seed_scoring_gives_the_originals_weight() -> None:
    done = deployflag("run", str(WORKED), env={"DEPLOYFLAG_SCORING": "seed"})
    assert done.returncode == 0, done.stderr
    result = orjson.loads(done.stdout)
    assert (result["scoring"], result["scores"][0]["issue_weight"]) == ("seed", 41)


def test_a_bad_recency_stops_with_the_variable_named() -> None:
    done = deployflag("run", str(WORKED), env={"DEPLOYFLAG_RECENCY": "soon"})
    assert done.returncode == 78
    assert "DEPLOYFLAG_RECENCY" in one_line_error(done)


def test_backtest_says_when_a_payload_is_too_small() -> None:
    done = deployflag("backtest", str(WORKED))
    assert done.returncode == 0, done.stderr
    assert done.stdout.decode().splitlines()[-1].startswith("verdict: too small for a verdict")


def test_backtest_json_lists_every_candidate(tmp_path: Path) -> None:
    payload = tmp_path / "reference.json"
    assert (
        deployflag("generate", "--size", "reference", "--seed", "3", "-o", str(payload)).returncode
        == 0
    )
    done = deployflag("backtest", str(payload), "--format", "json")
    assert done.returncode == 0, done.stderr
    report = orjson.loads(done.stdout)
    assert report["enough_data"] is True
    assert len(report["candidates"]) == 10
    assert report["verdict"]


def test_backtest_of_an_invalid_payload_is_one_line_and_exit_65(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_bytes(b'{"repo_id": 1, "analysis_run": []}')
    done = deployflag("backtest", str(bad))
    assert done.returncode == 65
    assert "missing_field" in one_line_error(done)


def test_run_reads_standard_input() -> None:
    done = deployflag("run", "-", "--compact", stdin=WORKED.read_bytes())
    assert done.returncode == 0
    assert done.stdout.count(b"\n") == 1
    assert orjson.loads(done.stdout)["scores"][0]["issue_weight"] == 95


def test_run_unreadable_file_is_one_line_and_exit_66(tmp_path: Path) -> None:
    done = deployflag("run", str(tmp_path / "missing.json"))
    assert done.returncode == exitcodes.RET_NO_INPUT
    assert "cannot read" in one_line_error(done)


@pytest.mark.parametrize(
    ("payload", "fragment"),
    [
        (b"{not json", "not_json"),
        (
            b'{"repo_id": 1, "analysis_run": [], "historical_run": [{"shortcode": "X"}]}',
            "historical_run[0].timestamp",
        ),
        (b'{"repo_id": 1, "analysis_run": [{}], "historical_run": []}', "analysis_run[0]"),
    ],
)
def test_run_invalid_payload_is_one_line_and_exit_65(payload: bytes, fragment: str) -> None:
    done = deployflag("run", "-", stdin=payload)
    assert done.returncode == exitcodes.RET_INVALID_INPUT
    assert fragment in one_line_error(done)


def test_bad_setting_is_one_line_naming_the_variable_and_exit_78() -> None:
    done = deployflag("run", str(WORKED), env={"DEPLOYFLAG_WORKERS": "lots"})
    assert done.returncode == exitcodes.RET_CONFIG
    assert "DEPLOYFLAG_WORKERS" in one_line_error(done)


def test_run_store_records_the_run_and_migrate_goes_up_and_down(tmp_path: Path) -> None:
    env = sqlite_env(tmp_path)
    assert deployflag("migrate", env=env).returncode == 0
    done = deployflag("run", "--store", "--request-id", "offline-1", str(WORKED), env=env)
    assert done.returncode == 0, done.stderr
    with sqlite3.connect(tmp_path / "df.db") as db:
        rows = db.execute("SELECT request_id, repo_id FROM model_performance_metadata").fetchall()
        status = db.execute("SELECT status FROM training_request").fetchall()
    assert rows == [("offline-1", "42")]
    assert status == [("done",)]
    down = deployflag("migrate", "--downgrade", "base", env=env)
    assert down.returncode == 0, down.stderr
    with sqlite3.connect(tmp_path / "df.db") as db:
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert "model_performance_metadata" not in tables


def test_serve_with_an_unreachable_database_exits_75_without_the_password() -> None:
    port = free_port()  # nothing listens there
    done = deployflag(
        "serve",
        env={
            "DEPLOYFLAG_DATABASE_URL": f"postgresql+asyncpg://df:hunter2@127.0.0.1:{port}/df",
            "DEPLOYFLAG_HTTP_PORT": "0",
            # The start-up wait for the database (a setting), kept short here.
            "DEPLOYFLAG_DATABASE_CONNECT_TIMEOUT": "1",
        },
    )
    assert done.returncode == exitcodes.RET_DATABASE, done.stderr
    err = done.stderr.decode()
    assert "hunter2" not in err
    assert "hunter2" not in done.stdout.decode()  # nor in the "not reachable yet" lines
    assert str(port) in err.splitlines()[-1]


def test_serve_with_an_unreachable_broker_exits_69_without_the_password(tmp_path: Path) -> None:
    port = free_port()
    done = deployflag(
        "serve",
        env={
            **sqlite_env(tmp_path),
            "DEPLOYFLAG_AMQP_URL": f"amqp://guest:hunter2@127.0.0.1:{port}/",
            "DEPLOYFLAG_BROKER_CONNECT_TIMEOUT": "1",
            "DEPLOYFLAG_HTTP_PORT": "0",
            "DEPLOYFLAG_WORKERS": "1",
        },
    )
    assert done.returncode == exitcodes.RET_BROKER, done.stderr
    last = done.stderr.decode().splitlines()[-1]
    assert "broker unreachable" in last
    assert "hunter2" not in done.stderr.decode()


def test_healthcheck_without_a_service_exits_1() -> None:
    done = deployflag("healthcheck", env={"DEPLOYFLAG_HTTP_PORT": str(free_port())})
    assert done.returncode == 1


@pytest.mark.rabbitmq
def test_submit_wait_prints_the_replies_of_a_running_service(
    start_service: Callable[..., ServiceProcess], service_env: dict[str, str]
) -> None:
    service = start_service(service_env)
    assert deployflag("healthcheck", env=service_env).returncode == 0
    done = deployflag(
        "submit", str(WORKED), "--count", "3", "--wait", "--timeout", "60", env=service_env
    )
    assert done.returncode == 0, done.stderr
    replies = [orjson.loads(line) for line in done.stdout.splitlines()]
    assert len(replies) == 3
    assert {r["scores"][0]["issue_weight"] for r in replies} == {95}
    assert service.is_ready()


@pytest.mark.rabbitmq
def test_submit_celery_and_wait_is_a_usage_error() -> None:
    done = deployflag("submit", str(WORKED), "--celery", "--wait")
    assert done.returncode == exitcodes.RET_USAGE
    assert "--wait needs JSON" in one_line_error(done)


@pytest.mark.postgres
def test_serve_with_a_wrong_database_password_exits_78_without_the_password(
    postgres: PostgresCluster,
) -> None:
    url = postgres.url_for(postgres.database, password="hunter2-wrong")
    done = deployflag("serve", env={"DEPLOYFLAG_DATABASE_URL": url, "DEPLOYFLAG_HTTP_PORT": "0"})
    assert done.returncode == exitcodes.RET_CONFIG, done.stderr
    assert "hunter2" not in done.stderr.decode()
    assert "password" in done.stderr.decode().splitlines()[-1].lower()


@pytest.mark.postgres
def test_migrate_on_postgresql_then_serve_without_auto_migrate(
    postgres: PostgresCluster, tmp_path: Path
) -> None:
    url = postgres.fresh_database("cli_migrate")
    env = {"DEPLOYFLAG_DATABASE_URL": url}
    behind = deployflag("run", "--store", str(WORKED), env=env)
    assert behind.returncode == exitcodes.RET_CONFIG
    assert "migrate" in one_line_error(behind)
    assert deployflag("migrate", env=env).returncode == 0
    assert deployflag("run", "--store", str(WORKED), env=env).returncode == 0
    table = postgres.psql("SELECT count(*) FROM model_performance_metadata", database="cli_migrate")
    assert table.split()[:3] == ["count", "-------", "1"]


def test_run_format_table_is_aligned_and_names_the_model() -> None:
    done = deployflag("run", str(WORKED), "--format", "table")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.decode().splitlines()
    heading = next(i for i, line in enumerate(lines) if line.startswith("shortcode"))
    assert lines[heading].split()[:2] == ["shortcode", "weight"]
    assert lines[heading + 2].split()[:2] == ["PYL-W0611", "95"]
    assert any(line.startswith("model: ") for line in lines[heading + 3 :])
