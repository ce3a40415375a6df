"""A backlog and a flood.

Backlog: 5,000 requests queued while no instance runs, then one starts. All are answered, its
memory stays bounded by the prefetch window (each request carries 20 KB of padding, so holding
the backlog would show as 100 MB), and /healthz answers throughout.

Flood: 2,000 bad messages interleaved with 200 good ones. Parking must not starve the good ones:
their median latency stays within 2x of the same 200 sent alone.
"""

from __future__ import annotations

import asyncio
import statistics
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import orjson
import psutil
import pytest
from aio_pika.abc import AbstractIncomingMessage

from tests.faults.conftest import FaultTable
from tests.faults.harness import Tally, metadata_ids
from tests.support.broker import Names, ServiceProcess

pytestmark = [pytest.mark.faults, pytest.mark.timeout(600), pytest.mark.rabbitmq]

ROOT = Path(__file__).resolve().parents[2]
WORKED = orjson.loads((ROOT / "examples" / "worked-example.json").read_bytes())
BACKLOG = 5_000
PADDING = 20_000  # bytes per request, in a field the service ignores
PREFETCH = 8
MAX_RSS_GROWTH = 50 * 1024**2  # far below the 100 MB the backlog's bodies add up to
GOOD = 200
BAD_PER_GOOD = 10
MAX_LATENCY_RATIO = 2.0
FLOOD_PREFETCH = 16  # 2 (the default for 2 workers) measured the same


class TimedTally(Tally):
    """A tally that also notes when each reply arrived."""

    arrived: dict[str, float]

    async def __aenter__(self) -> TimedTally:
        self.arrived = {}
        await super().__aenter__()
        return self

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        if message.correlation_id and message.correlation_id not in self.arrived:
            self.arrived[message.correlation_id] = time.monotonic()
        await super()._on_reply(message)


def healthz(service: ServiceProcess) -> int | None:
    try:
        url = f"http://127.0.0.1:{service.http_port}/healthz"
        with urllib.request.urlopen(url, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except OSError:
        return None


async def test_a_backlog_of_5000_then_one_instance_starts(
    start_service: Callable[..., ServiceProcess],
    service_env: dict[str, str],
    rabbit_url: str,
    names: Names,
    fault_table: FaultTable,
) -> None:
    body = orjson.dumps({**WORKED, "padding": "p" * PADDING})
    async with Tally(rabbit_url, names) as tally:
        for start in range(0, BACKLOG, 100):
            await asyncio.gather(
                *(tally.publish(body, message_id=f"req-{i:04d}") for i in range(start, start + 100))
            )
        service = start_service(
            service_env, DEPLOYFLAG_WORKERS="2", DEPLOYFLAG_PREFETCH=str(PREFETCH)
        )
        assert service.proc is not None
        main = psutil.Process(service.proc.pid)
        baseline = main.memory_info().rss
        peak, checks, failed = baseline, 0, 0
        while tally.unanswered():
            peak = max(peak, main.memory_info().rss)
            status = await asyncio.to_thread(healthz, service)
            checks += 1
            failed += status != 200
            if time.monotonic() - tally.started > 500:
                break
            await asyncio.sleep(0.25)  # sampling interval
        await tally.settle(timeout=30)
        rows = await metadata_ids(service_env["DEPLOYFLAG_DATABASE_URL"])
        growth = peak - baseline
        row = fault_table.add(
            tally.row(
                f"backlog of {BACKLOG} (20 KB each) then one instance: peak RSS "
                f"{peak / 1024**2:.0f} MB (+{growth / 1024**2:.1f} MB, prefetch {PREFETCH}), "
                f"/healthz {checks - failed}/{checks} OK",
                rows,
                [service],
            )
        )
    print(row)  # shown with -rA; the table is written by make test-faults
    assert failed == 0, f"/healthz failed {failed} of {checks} times"
    assert growth < MAX_RSS_GROWTH, f"RSS grew {growth / 1024**2:.0f} MB"
    assert row.lost == 0
    assert row.duplicates == 0
    assert (row.sent, row.replies, row.rows, row.parked) == (BACKLOG, BACKLOG, BACKLOG, 0)


async def test_bad_messages_do_not_starve_good_ones(
    start_service: Callable[..., ServiceProcess],
    service_env: dict[str, str],
    rabbit_url: str,
    names: Names,
    fault_table: FaultTable,
) -> None:
    good = orjson.dumps(WORKED)
    # Every good request through a worker, alone or flooded: the flood's cost is what is measured.
    # (By default a lone one is computed in the service process, which only the unloaded phase
    # would get, so the ratio would measure that shortcut too: 8.4 against 3.6 ms when measured.)
    service = start_service(
        service_env,
        DEPLOYFLAG_WORKERS="2",
        DEPLOYFLAG_PREFETCH=str(FLOOD_PREFETCH),
        DEPLOYFLAG_INLINE_JOB_MAX_BYTES="0",
    )
    async with TimedTally(rabbit_url, names) as tally:
        published: dict[str, float] = {}

        async def run(prefix: str, bad_per_good: int) -> list[float]:
            for i in range(GOOD):
                for j in range(bad_per_good):
                    await tally.publish(b"{not json", message_id=f"{prefix}-bad-{i:03d}-{j}")
                rid = f"{prefix}-good-{i:03d}"
                await tally.publish(good, message_id=rid)
                published[rid] = time.monotonic()
                await asyncio.sleep(0.05)  # a steady stream: latency, not queueing, is measured
            await tally.settle(timeout=240)
            ids = [f"{prefix}-good-{i:03d}" for i in range(GOOD)]
            return [tally.arrived[rid] - published[rid] for rid in ids]

        alone = await run("alone", 0)
        flooded = await run("flood", BAD_PER_GOOD)
        rows = await metadata_ids(service_env["DEPLOYFLAG_DATABASE_URL"])
        loaded_ms = statistics.median(flooded) * 1000
        alone_ms = statistics.median(alone) * 1000
        ratio = loaded_ms / alone_ms
        row = fault_table.add(
            tally.row(
                f"{GOOD * BAD_PER_GOOD} bad interleaved with {GOOD} good: median good latency "
                f"{loaded_ms:.1f} ms vs {alone_ms:.1f} ms alone "
                f"(ratio {ratio:.2f}, at most {MAX_LATENCY_RATIO:g})",
                rows,
                [service],
            )
        )
    print(row)  # shown with -rA; the table is written by make test-faults
    # Nothing lost, nothing twice, whatever the latency
    assert row.lost == 0
    assert row.duplicates == 0
    goods = 2 * GOOD
    assert (row.replies, row.rows, row.parked) == (goods, goods, GOOD * BAD_PER_GOOD)
    if ratio > MAX_LATENCY_RATIO:
        # Latency is measured, not asserted (a shared machine's load moves it): a miss is kept
        # visible as xfail. Each park costs a log line, an audit-row write (shared commits) and
        # a confirmed publish on the main loop; 1.5-1.8x on a slow 2-core machine, more when
        # other work shares the cores (docs/faults.md).
        pytest.xfail(f"good requests' median latency {ratio:.1f}x unloaded (target 2x)")
