"""The shipped monitoring files: alert rules checked and unit-tested by promtool, the scrape
config valid, every dashboard and alert query valid PromQL naming only series the service
exports, and the compose `monitoring` profile mounting them."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from deployflag.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS = ROOT / "docker" / "prometheus"
DASHBOARD = ROOT / "docker" / "grafana" / "dashboards" / "deployflag.json"
COMPOSE = ROOT / "docker" / "compose.yaml"
# Series that come from elsewhere than the service: Prometheus itself, RabbitMQ's own plugin.
FOREIGN = {"up", "rabbitmq_queue_messages_ready"}
# A PromQL name: not a function call, keyword, label name or string (checked against a parse
# by promtool below; this only has to find the metric names).
NAME = re.compile(r"(?<![\w\"'{=.$])([a-zA-Z_:][a-zA-Z0-9_:]*)(?![\w(\"'])")
KEYWORDS = {"sum", "by", "min", "max", "count", "rate", "increase", "histogram_quantile", "and",
            "or", "unless", "without", "on", "ignoring", "le", "offset"}  # fmt: skip


def promtool(*args: str, cwd: Path = PROMETHEUS) -> subprocess.CompletedProcess[str]:
    if shutil.which("promtool") is None:
        pytest.fail("promtool not found: run `scripts/services.sh test-deps` (make test does)")
    return subprocess.run(
        ["promtool", *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )


def exported_names() -> set[str]:
    """Every sample name a fresh service's /metrics shows (counters with _total, histograms with
    _bucket/_sum/_count, the info metric with _info)."""
    registry = Metrics().registry
    return {sample.name for family in registry.collect() for sample in family.samples}


def alert_rules() -> list[dict[str, Any]]:
    data = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())
    return [rule for group in data["groups"] for rule in group["rules"]]


def dashboard_queries() -> list[tuple[str, str]]:
    data = json.loads(DASHBOARD.read_text())
    return [
        (panel["title"], target["expr"]) for panel in data["panels"] for target in panel["targets"]
    ]


def metric_names(expr: str) -> set[str]:
    without_strings = re.sub(r'"[^"]*"', '""', expr)
    without_labels = re.sub(r"\{[^}]*\}", "", without_strings)
    without_ranges = re.sub(r"\[[^\]]*\]", "", without_labels)
    without_groupings = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", without_ranges)
    return {m for m in NAME.findall(without_groupings) if m not in KEYWORDS}


def test_alert_rules_pass_promtool_check() -> None:
    done = promtool("check", "rules", "alerts.yml")
    assert done.returncode == 0, done.stdout + done.stderr


def test_alert_rules_unit_tests_pass() -> None:
    done = promtool("test", "rules", "alerts.test.yml")
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_alert_is_unit_tested_firing_and_not_firing() -> None:
    tests = yaml.safe_load((PROMETHEUS / "alerts.test.yml").read_text())["tests"]
    firing: set[str] = set()
    quiet: set[str] = set()
    for case in tests:
        for check in case["alert_rule_test"]:
            (firing if check["exp_alerts"] else quiet).add(check["alertname"])
    alerts = {rule["alert"] for rule in alert_rules()}
    assert firing == alerts
    assert quiet == alerts


def test_scrape_config_is_valid_and_loads_the_rules() -> None:
    done = promtool("check", "config", "prometheus.yml")
    assert done.returncode == 0, done.stdout + done.stderr
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    assert config["rule_files"] == ["alerts.yml"]
    [job] = config["scrape_configs"]
    assert job["job_name"] == "deployflag"  # what the DeployflagDown alert selects


def test_the_name_finder_finds_names() -> None:
    expr = 'histogram_quantile(0.9, sum by (le, stage) (rate(a_bucket{stage="x"}[5m]))) / b_total'
    assert metric_names(expr) == {"a_bucket", "b_total"}


def test_every_query_names_only_exported_series() -> None:
    exported = exported_names()
    queries = dashboard_queries() + [(rule["alert"], rule["expr"]) for rule in alert_rules()]
    for title, expr in queries:
        names = metric_names(expr)
        assert names, f"{title}: no metric found in {expr!r}"
        unknown = names - exported - FOREIGN
        assert not unknown, f"{title}: {sorted(unknown)} not exported by the service"


def test_every_dashboard_query_is_valid_promql(tmp_path: Path) -> None:
    # promtool parses a rule file's expressions: one recording rule per dashboard query.
    rules = [
        {"record": f"dashboard:query_{i}", "expr": expr.replace("$__rate_interval", "5m")}
        for i, (_, expr) in enumerate(dashboard_queries())
    ]
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    done = promtool("check", "rules", str(path))
    assert done.returncode == 0, done.stdout + done.stderr


def test_dashboard_covers_what_operators_watch() -> None:
    exprs = " ".join(expr for _, expr in dashboard_queries())
    for needed in (
        "deployflag_requests_total",  # by outcome, and parked by reason
        'outcome="parked"',
        "deployflag_stage_seconds_bucket",
        "deployflag_in_flight",
        "deployflag_event_loop_lag",
        "deployflag_pool_rebuilds_total",
    ):
        assert needed in exprs


def test_compose_monitoring_profile_mounts_the_shipped_files() -> None:
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    for name in ("prometheus", "grafana"):
        assert services[name]["profiles"] == ["monitoring"]
        for volume in services[name]["volumes"]:
            source = volume.split(":", 1)[0]
            if source.startswith("./"):
                assert (COMPOSE.parent / source).exists(), f"{name} mounts missing {source}"
