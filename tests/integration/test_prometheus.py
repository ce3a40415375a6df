"""A real Prometheus (Debian's package) scrapes a running `serve` on 127.0.0.1, evaluates the
shipped alert rules and answers every dashboard query from the service's series."""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.broker import ServiceProcess, Upstream
from tests.support.toolkit import free_port, wait_until
from tests.unit.test_monitoring_files import PROMETHEUS, dashboard_queries

pytestmark = pytest.mark.rabbitmq

ROOT = Path(__file__).resolve().parents[2]
WORKED = (ROOT / "examples" / "worked-example.json").read_bytes()


class Prometheus:
    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"

    def api(self, path: str, **params: str) -> Any:
        url = f"{self.base}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                body = json.loads(response.read())
        except OSError:
            return None
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = self.api("query", query=expr)
        return [] if data is None else list(data["result"])


@pytest.fixture
def prometheus_for(tmp_path: Path) -> Iterator[Callable[[int], Prometheus]]:
    """Factory: a Prometheus server scraping 127.0.0.1:PORT every second with the shipped rules."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("prometheus not found: run `scripts/services.sh test-deps` (make test does)")
    started: list[subprocess.Popen[bytes]] = []

    def start(target_port: int) -> Prometheus:
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(PROMETHEUS / "alerts.yml")],
            "scrape_configs": [
                {
                    "job_name": "deployflag",
                    "static_configs": [{"targets": [f"127.0.0.1:{target_port}"]}],
                }
            ],
        }
        path = tmp_path / "prometheus.yml"
        path.write_text(yaml.safe_dump(config))
        port = free_port()
        log = (tmp_path / "prometheus.log").open("wb")
        started.append(
            subprocess.Popen(
                [
                    binary,
                    f"--config.file={path}",
                    f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )
        server = Prometheus(port)
        wait_until(lambda: server.api("status/buildinfo"), 60, "Prometheus to answer", every=0.2)
        return server

    yield start
    for proc in started:
        proc.terminate()
        proc.wait(timeout=30)


async def test_prometheus_scrapes_the_service_and_the_rules_and_dashboard_see_its_series(
    start_service: Callable[..., ServiceProcess],
    service_env: dict[str, str],
    upstream: Upstream,
    prometheus_for: Callable[[int], Prometheus],
) -> None:
    # Given a service that answered one request, scraped by a real Prometheus
    service = start_service(service_env)
    await upstream.publish(WORKED, message_id="ok-1")
    await upstream.drain("save_result", 1, timeout=60)
    prometheus = prometheus_for(service.http_port)

    def target_up() -> bool:
        data = prometheus.api("targets")
        return bool(data) and [t["health"] for t in data["activeTargets"]] == ["up"]

    wait_until(target_up, 60, "the deployflag target to be up", every=0.5)
    # When it parks a request while Prometheus watches
    await upstream.publish(b"{nope", message_id="bad-1")
    await upstream.drain("failed", 1, timeout=60)
    # Then its API lists the deployflag series with their values
    names = set(prometheus.api("label/__name__/values"))
    for name in (
        "deployflag_requests_total",
        "deployflag_stage_seconds_bucket",
        "deployflag_in_flight",
        "deployflag_event_loop_lag_seconds_bucket",
        "deployflag_pool_rebuilds_total",
        "deployflag_consumer_ready",
        "deployflag_database_ok",
    ):
        assert name in names
    [ready] = prometheus.query('deployflag_consumer_ready{job="deployflag"}')
    assert ready["value"][1] == "1"
    [parked] = wait_until(
        lambda: prometheus.query('deployflag_requests_total{outcome="parked"}'),
        30,
        "the parked series to be scraped",
    )
    assert (parked["metric"]["reason"], parked["value"][1]) == ("not_json", "1")
    # And every dashboard query has an answer (rates need two scrapes: wait for them)
    for title, expr in dashboard_queries():
        query = expr.replace("$__rate_interval", "1m")
        wait_until(lambda q=query: prometheus.query(q), 60, f"an answer to {title!r}: {query}")

    # And the shipped rules are loaded and evaluated without error; the park raised its alert
    def rules_evaluated() -> list[dict[str, Any]] | None:
        groups = prometheus.api("rules")["groups"]
        rules = [rule for group in groups for rule in group["rules"]]
        return rules if rules and all(r.get("lastEvaluation", "").startswith("2") and
                                      not r["lastEvaluation"].startswith("0001")
                                      for r in rules) else None  # fmt: skip

    rules = wait_until(rules_evaluated, 60, "the alert rules to be evaluated", every=0.5)
    assert len(rules) == 9
    assert {rule["health"] for rule in rules} == {"ok"}

    def parking_alert() -> list[dict[str, Any]]:
        return [
            alert
            for alert in prometheus.api("alerts")["alerts"]
            if alert["labels"]["alertname"] == "DeployflagParking"
        ]

    [alert] = wait_until(parking_alert, 60, "the DeployflagParking alert", every=0.5)
    assert alert["labels"]["reason"] == "not_json"
    assert alert["state"] == "firing"
