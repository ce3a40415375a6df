"""The decoder under arbitrary deliveries (a few hundred here; the fault suite runs 10,000+), and
its work growing linearly with the size of what it is given."""

from __future__ import annotations

import gc
import sys
import time
from collections.abc import Callable
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from deployflag.synthetic import generate
from tests.support.decoder_fuzz import (
    TASK,
    bodies,
    check_contract,
    content_types,
    header_tables,
    message_ids,
)

CELERY_BODY = orjson.dumps([[generate("small", seed=1)], {}, {"callbacks": None}])
FAST = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@FAST
@given(bodies, header_tables(), content_types, message_ids)
def test_any_delivery_decodes_to_a_request_or_a_rejection(
    body: bytes, headers: dict[str, Any], content_type: str | None, message_id: str | None
) -> None:
    event(check_contract(body, headers, content_type, message_id))


@settings(FAST, max_examples=100)
@given(header_tables(), st.sampled_from(["application/json", None]), message_ids)
def test_celery_shaped_deliveries_with_any_headers(
    headers: dict[str, Any], content_type: str | None, message_id: str | None
) -> None:
    # A well-formed protocol-2 body, so the header path and decode meet on the same delivery.
    event(check_contract(CELERY_BODY, {**headers, "task": TASK}, content_type, message_id))


# --- linear work -----------------------------------------------------------------------------
#
# Work is measured two ways, neither a wall-clock bound: the number of Python-level calls
# (exact, catches a quadratic loop in our code) and the CPU time of this process (catches one in
# the C libraries), each as the ratio between an input GROWTH times larger and the base one.

GROWTH = 8
# Linear work grows ~8x; quadratic would grow ~64x. The CPU bound leaves room for noise (caches,
# a loaded machine) without letting a quadratic through.
MAX_CALL_RATIO = GROWTH * 1.5
MAX_CPU_RATIO = GROWTH * 3.0


def rows_request(n: int) -> bytes:
    row = {
        "branch_name": "master",
        "created_at": "2021-03-01T10:00:00Z",
        "shortcode": "PYL-W0611",
        "frequency_detected": 3,
    }
    hist = {"timestamp": "2021-03-01T10:00:00Z", "shortcode": "PYL-W0611", "frequency": 2}
    return orjson.dumps({"repo_id": 1, "analysis_run": [row] * n, "historical_run": [hist] * n})


def celery(body: bytes) -> tuple[bytes, dict[str, Any], str]:
    return b"[[" + body + b"],{},{}]", {"task": TASK, "id": "x"}, "application/json"


FAMILIES: dict[str, Callable[[int], tuple[bytes, dict[str, Any], str | None]]] = {
    "plain JSON rows": lambda n: (rows_request(n), {}, "application/json"),
    "Celery protocol 2 rows": lambda n: celery(rows_request(n)),
    "rows with a bad last value": lambda n: (
        rows_request(n)[:-3] + b'"x"]}',
        {},
        "application/json",
    ),
    "huge task header": lambda n: (b"{}", {"task": "t" * (200 * n)}, "application/json"),
    "huge id header": lambda n: (b"[[{}],{},{}]", {"task": TASK, "id": "i" * (200 * n)}, None),
    "huge argsrepr": lambda n: (b"{}", {"argsrepr": "a" * (200 * n)}, None),
    "many headers": lambda n: (b"{}", {f"h{i}": {"k": [i]} for i in range(2 * n)}, None),
    "huge content type": lambda n: (b"{}", {}, "application/" + "j" * (200 * n)),
    "not UTF-8": lambda n: (b'{"a":"' + b"\xff" * (200 * n) + b'"}', {}, None),
    "long string value": lambda n: (b'{"repo_id":"' + b"r" * (200 * n) + b'"}', {}, None),
    "deep then wide": lambda n: (b"[" * 500 + b"1," * (50 * n) + b"1" + b"]" * 500, {}, None),
}
BASE = 2_000


def measure(make: Callable[[], Any], repeat: int = 5) -> tuple[int, float]:
    """(Python-level calls, least CPU seconds) of one run of ``make``."""
    calls = 0

    def count(_frame: Any, what: str, _arg: Any) -> None:
        nonlocal calls
        if what in ("call", "c_call"):
            calls += 1

    sys.setprofile(count)
    try:
        make()
    finally:
        sys.setprofile(None)
    cpu = []
    # The fastest of several runs, with the cyclic collector off: a collection triggered by the
    # large input's allocations scans every object the test session holds, which is not the
    # decoder's work and made the ratio depend on what ran before.
    gc.collect()
    gc.disable()
    try:
        for _ in range(repeat):
            started = time.process_time()
            make()
            cpu.append(time.process_time() - started)
    finally:
        gc.enable()
    return calls, min(cpu)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_decoding_work_grows_linearly_with_the_input(family: str) -> None:
    def runner(n: int) -> Callable[[], str]:
        body, headers, content_type = FAMILIES[family](n)
        return lambda: check_contract(body, headers, content_type, "m")

    small_calls, small_cpu = measure(runner(BASE))
    large_calls, large_cpu = measure(runner(BASE * GROWTH))
    assert large_calls <= small_calls * MAX_CALL_RATIO + 50, (small_calls, large_calls)
    # Below a millisecond the clock's resolution is the measurement: compare from there.
    floor = 1e-3
    assert max(large_cpu, floor) <= max(small_cpu, floor) * MAX_CPU_RATIO, (small_cpu, large_cpu)
