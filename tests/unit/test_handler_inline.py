"""Which jobs the handler computes in its own process, and that they settle like a worker's.

A small first delivery that arrives while nothing else is in flight skips the round trip to a
worker; everything else (a redelivered copy, a larger body, a delivery with company) goes to the
pool as before. The rig's fake pool records every job it is given, so "not in the pool" is
observable.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from deployflag import worker
from tests.unit.handler_fakes import FakeMessage, Rig, rig

ROOT = Path(__file__).resolve().parents[2]
WORKED = (ROOT / "examples" / "worked-example.json").read_bytes()
LIMIT = 16 * 1024


def inline_rig(**overrides: object) -> Rig:
    return rig(inline_job_max_bytes=LIMIT, **overrides)


def inline_jobs(r: Rig) -> float:
    return r.metrics.registry.get_sample_value("deployflag_inline_jobs_total") or 0.0


def request(request_id: str, body: bytes = WORKED, **fields: object) -> FakeMessage:
    return FakeMessage(body, message_id=request_id, **fields)  # type: ignore[arg-type]


def scores(r: Rig) -> list[object]:
    return [orjson.loads(reply.body)["scores"] for reply in r.publisher.replies]


async def test_a_lone_small_first_delivery_is_computed_here_with_the_workers_answer() -> None:
    here, pooled = inline_rig(), rig()
    message = await here.deliver(request("r1"))
    await pooled.deliver(request("r1"))
    assert message.settled == ["ack"]
    assert here.pool.calls == [], "no job was handed to the pool"
    assert inline_jobs(here) == 1
    assert here.store.records == ["r1"]
    assert here.store.attempts["r1"] == 1
    assert scores(here) == scores(pooled), "the same weights as from a worker"
    assert here.timed("pipeline") == 1, "timed as a pipeline run"
    assert pooled.pool.calls == ["process"]
    assert inline_jobs(pooled) == 0


async def test_a_redelivered_copy_goes_to_a_worker() -> None:
    # A first delivery that crashed the service is delivered again: that copy must not.
    r = inline_rig()
    await r.deliver(request("r1", redelivered=True))
    assert r.pool.calls == ["process"]
    assert inline_jobs(r) == 0


async def test_a_body_over_the_limit_goes_to_a_worker() -> None:
    r = rig(inline_job_max_bytes=len(WORKED) - 1)
    await r.deliver(request("r1"))
    assert r.pool.calls == ["process"]
    assert inline_jobs(r) == 0


async def test_seed_scoring_sends_every_job_to_a_worker() -> None:
    # Its grid search can hold the loop for a tenth of a second on a body of a few kB.
    r = inline_rig(scoring="seed")
    await r.deliver(request("r1"))
    assert r.pool.calls == ["process"]
    assert inline_jobs(r) == 0


async def test_zero_sends_every_job_to_a_worker() -> None:
    r = rig(inline_job_max_bytes=0)
    await r.deliver(request("r1"))
    assert r.pool.calls == ["process"]


async def test_a_delivery_with_another_in_flight_goes_to_a_worker() -> None:
    r = inline_rig()
    release, running = asyncio.Event(), asyncio.Event()

    async def held(*args: object) -> object:
        running.set()
        await release.wait()
        return worker.process(*args)  # type: ignore[arg-type]

    r.pool.script.append(held)
    # A redelivered copy claims first and then waits in the pool: in flight for the whole test.
    first = asyncio.create_task(r.deliver(request("r1", redelivered=True)))
    await asyncio.wait_for(running.wait(), 10)
    second = await r.deliver(request("r2"))
    assert second.settled == ["ack"]
    assert r.pool.calls == ["process", "process"], "the second was not alone: a worker ran it"
    assert inline_jobs(r) == 0
    release.set()
    assert (await asyncio.wait_for(first, 10)).settled == ["ack"]
    # Once alone again, the next small first delivery is computed here.
    await r.deliver(request("r3"))
    assert r.pool.calls == ["process", "process"]
    assert inline_jobs(r) == 1


async def test_a_rejected_inline_job_is_parked_like_a_workers_with_its_attempt_counted() -> None:
    body = orjson.loads(WORKED)
    body["analysis_run"][0]["created_at"] = "not a time"
    bad = orjson.dumps(body)
    here, pooled = inline_rig(), rig()
    message = await here.deliver(request("bad", bad))
    await pooled.deliver(request("bad", bad))
    assert message.settled == ["ack"]
    assert here.pool.calls == []
    assert inline_jobs(here) == 1
    assert here.publisher.parked == pooled.publisher.parked == [("bad", "invalid_timestamp")]
    assert here.store.attempts["bad"] == 1, "claimed after the failure: the attempt counts"
    assert here.store.failures == pooled.store.failures


@pytest.fixture
def shortcode_cap() -> Iterator[None]:
    """What the service sets up before it consumes: the imports and a cap of 1 shortcode (the
    cap and the one-thread limit undone afterwards: this test process goes on)."""
    saved_cap, saved_limits = worker._max_shortcodes, worker._limits
    worker.prepare_compute(max_shortcodes=1)
    try:
        yield
    finally:
        worker._limits.restore_original_limits()
        worker._max_shortcodes, worker._limits = saved_cap, saved_limits


@pytest.mark.usefixtures("shortcode_cap")
async def test_the_shortcode_cap_holds_for_a_job_computed_here() -> None:
    request_body = orjson.loads(WORKED)
    extra = [{**row, "shortcode": "PYL-W9999"} for row in request_body["analysis_run"][:2]]
    two_codes = orjson.dumps({**request_body, "analysis_run": request_body["analysis_run"] + extra})
    r = inline_rig()
    await r.deliver(request("wide", two_codes))
    assert inline_jobs(r) == 1
    assert r.publisher.parked == [("wide", "too_many_shortcodes")]
