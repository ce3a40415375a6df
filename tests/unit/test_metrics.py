"""Metrics: a registry per instance, the series the service calls, and the exposition."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from deployflag.metrics import Metrics, package_version

NAMES = (
    "deployflag_requests_total",
    "deployflag_stage_seconds",
    "deployflag_publish_to_ack_seconds",
    "deployflag_in_flight",
    "deployflag_pool_rebuilds_total",
    "deployflag_event_loop_lag_seconds",
    "deployflag_event_loop_lag_max_seconds",
    "deployflag_consumer_ready",
    "deployflag_database_ok",
    "deployflag_prefetch_window",
    "deployflag_burst_window_changes_total",
    "deployflag_info",
)


@pytest.fixture
def metrics() -> Metrics:
    return Metrics(process_metrics=False)


def value(metrics: Metrics, name: str, **labels: str) -> float:
    sample = metrics.registry.get_sample_value(name, labels)
    return 0.0 if sample is None else sample


def test_every_series_is_exported(metrics: Metrics) -> None:
    text, content_type = metrics.render()
    assert content_type.startswith("text/plain; version=0.0.4")
    for name in NAMES:
        assert f"# TYPE {name.removesuffix('_total')}" in text.decode(), name
    assert f'deployflag_info{{version="{package_version()}"}} 1.0' in text.decode()


def test_instances_do_not_share_a_registry() -> None:
    # Given two services in one process (two tests, two instances)
    first, second = Metrics(), Metrics()
    # When one counts a request
    first.requests.labels(outcome="ok", reason="").inc()
    # Then the other did not, and neither collided on registration
    assert value(first, "deployflag_requests_total", outcome="ok", reason="") == 1
    assert value(second, "deployflag_requests_total", outcome="ok", reason="") == 0
    assert b"process_resident_memory_bytes" in first.render()[0]


def test_counters_move_in_the_exposition(metrics: Metrics) -> None:
    line = 'deployflag_requests_total{outcome="parked",reason="invalid_json"}'
    assert line.encode() not in metrics.render()[0]

    metrics.requests.labels(outcome="parked", reason="invalid_json").inc()
    metrics.requests.labels(outcome="parked", reason="invalid_json").inc()
    metrics.pool_rebuilds.labels(cause="crash").inc()
    metrics.stage_seconds.labels(stage="pipeline").observe(0.42)
    metrics.in_flight.inc()

    text = metrics.render()[0].decode()
    assert f"{line} 2.0" in text
    assert 'deployflag_pool_rebuilds_total{cause="crash"} 1.0' in text
    assert 'deployflag_pool_rebuilds_total{cause="time_limit"} 0.0' in text
    assert 'deployflag_stage_seconds_bucket{le="0.5",stage="pipeline"} 1.0' in text
    assert 'deployflag_stage_seconds_bucket{le="0.25",stage="pipeline"} 0.0' in text
    assert "deployflag_in_flight 1.0" in text
    assert "_created" not in text


def test_stage_buckets_span_a_millisecond_to_ten_minutes(metrics: Metrics) -> None:
    text = metrics.render()[0].decode()
    assert 'deployflag_stage_seconds_bucket{le="0.001",stage="total"}' in text
    assert 'deployflag_stage_seconds_bucket{le="600.0",stage="total"}' in text
    assert 'deployflag_event_loop_lag_seconds_bucket{le="10.0"}' in text


def test_openmetrics_is_negotiated(metrics: Metrics) -> None:
    text, content_type = metrics.render("application/openmetrics-text; version=1.0.0")
    assert content_type.startswith("application/openmetrics-text")
    assert text.endswith(b"# EOF\n")


def test_publish_to_ack_from_amqp_timestamps(metrics: Metrics) -> None:
    published = datetime(2024, 1, 1, 12, 0, 0)  # naive: AMQP timestamps are UTC
    now = datetime(2024, 1, 1, 12, 0, 3, tzinfo=UTC).timestamp()
    metrics.observe_publish_to_ack(published, now=now)
    metrics.observe_publish_to_ack(now + 60, now=now)  # the publisher's clock runs ahead
    metrics.observe_publish_to_ack(None, now=now)  # no timestamp: nothing to measure

    assert value(metrics, "deployflag_publish_to_ack_seconds_count") == 2
    assert value(metrics, "deployflag_publish_to_ack_seconds_sum") == pytest.approx(3.0)
