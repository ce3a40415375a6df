"""A wider prefetch window while requests are short: a second consumer on the training queue.

The prefetch window (``DEPLOYFLAG_PREFETCH``, default one delivery per worker) is what keeps a
request that trains for minutes from waiting on a busy instance while another is idle. For small
requests it is too narrow: each one holds its slot while its record and confirmed reply go out,
and a worker waits for the broker's next delivery meanwhile. A window that follows the traffic
would be wide for small requests and narrow for long ones, but RabbitMQ cannot change it in
place: a channel's per-consumer prefetch applies only to consumers created after it was set,
and quorum queues have no channel-wide limit.

So the extra window is a second consumer, on a channel of its own with its own prefetch
(``DEPLOYFLAG_BURST_PREFETCH``) and a lower consumer priority than any base window, so it only
takes what no instance's base window has room for. It is subscribed once a whole window's worth
of requests in a row finished within ``DEPLOYFLAG_BURST_SHORT_SECONDS``, and cancelled as soon
as one did not: a request still running past that time, or a body larger than a small request's.
What it took before the decision is handled like any delivery (acks go on its channel). What
reaches it after the decision, sent by the broker before the cancellation arrived, is handed
straight back (nack with requeue, before anything is claimed or run), so another instance can
start it: a closed window takes no more than the base prefetch beyond what it already accepted.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from aio_pika.abc import AbstractIncomingMessage, AbstractQueue, AbstractRobustConnection

from deployflag import logs
from deployflag.delivery import BROKER_ERRORS, SETTLE_TIMEOUT
from deployflag.metrics import Metrics

log = logs.get_logger("deployflag.burst")
Dispatch = Callable[[AbstractIncomingMessage], Awaitable[None]]
CANCEL_TIMEOUT = 10.0  # seconds for the broker to confirm a consumer's cancellation
# Below every plain consumer (priority 0): the broker hands the burst consumer a message only
# when no instance's base window has room, so an idle instance is served before a busy one's
# burst window.
PRIORITY = -1


@dataclass
class BurstPolicy:
    """Whether the wider window is wanted, from when each delivery started and ended.

    Pure (the clock is passed in), so every rule is tested without a broker.
    """

    short_seconds: float  # a request that takes longer than this closes the window
    large_bytes: int  # a body larger than this closes it at once: most likely a long training
    streak_needed: int  # requests in a row within short_seconds before it opens
    wanted: bool = False
    _in_flight: dict[int, float] = field(default_factory=dict)  # token → started
    _streak: int = 0
    _stopped: bool = False

    def started(self, token: int, size: int, now: float) -> None:
        self._in_flight[token] = now
        if size > self.large_bytes:
            self._narrow()

    def finished(self, token: int, now: float) -> None:
        started = self._in_flight.pop(token, None)
        if started is None:
            return
        if now - started > self.short_seconds:
            self._narrow()
            return
        self._streak += 1
        if (
            not self.wanted
            and not self._stopped
            and self._streak >= self.streak_needed
            and not self.overdue(now)
        ):
            self.wanted = True

    def overdue(self, now: float) -> bool:
        """Whether a request in flight has run longer than a short one may."""
        return any(now - started > self.short_seconds for started in self._in_flight.values())

    def check(self, now: float) -> None:
        """Close the window when a request in flight turned out long (called periodically)."""
        if self.wanted and self.overdue(now):
            self._narrow()

    def stop(self) -> None:
        """Never again: the service is stopping."""
        self._stopped = True
        self._narrow()

    def _narrow(self) -> None:
        self.wanted = False
        self._streak = 0


class BurstConsumer:
    """The second consumer: subscribed and cancelled to follow ``BurstPolicy.wanted``.

    One task changes the subscription, so a burst of decisions never races two ``basic.consume``
    calls; it only ever moves the subscription to the latest wanted state.
    """

    def __init__(
        self,
        connection: AbstractRobustConnection,
        queue_name: str,
        *,
        prefetch: int,
        base_prefetch: int,
        policy: BurstPolicy,
        dispatch: Dispatch,
        metrics: Metrics,
    ) -> None:
        self._connection = connection
        self._queue_name = queue_name
        self._prefetch = prefetch
        self._base_prefetch = base_prefetch
        self.policy = policy
        self._dispatch = dispatch
        self._metrics = metrics
        self._tokens = itertools.count()
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._tick: asyncio.TimerHandle | None = None
        self._queue: AbstractQueue | None = None
        self._tag: str | None = None

    async def start(self) -> None:
        channel = await self._connection.channel()
        await channel.set_qos(prefetch_count=self._prefetch)
        self._queue = await channel.get_queue(self._queue_name, ensure=True)
        self._task = asyncio.create_task(self._follow())

    # --- what the service reports for every delivery, from either consumer -----------------

    def started(self, message: AbstractIncomingMessage) -> int:
        token = next(self._tokens)
        was = self.policy.wanted
        self.policy.started(token, len(message.body), time.monotonic())
        self._note(was)
        return token

    def finished(self, token: int) -> None:
        was = self.policy.wanted
        self.policy.finished(token, time.monotonic())
        self._note(was)

    def _note(self, was: bool) -> None:
        if self.policy.wanted != was:
            self._changed.set()
            if self.policy.wanted:
                self._arm()

    def _arm(self) -> None:
        """While the window is wanted, look for an overdue request twice per short time."""
        if self._tick is None:
            loop = asyncio.get_running_loop()
            self._tick = loop.call_later(self.policy.short_seconds / 2, self._check)

    def _check(self) -> None:
        self._tick = None
        was = self.policy.wanted
        self.policy.check(time.monotonic())
        self._note(was)
        if self.policy.wanted:
            self._arm()

    async def _deliver(self, message: AbstractIncomingMessage) -> None:
        if self.policy.wanted:
            await self._dispatch(message)
            return
        # Sent before our cancellation reached the broker: back to the queue, untouched (no
        # claim, no attempt counted), for whichever consumer has room.
        self._metrics.burst_handed_back.inc()
        with contextlib.suppress(*BROKER_ERRORS):  # a closed channel hands it back by itself
            await asyncio.wait_for(message.nack(requeue=True), SETTLE_TIMEOUT)

    # --- the subscription ----------------------------------------------------------------------

    async def _follow(self) -> None:
        while True:
            await self._changed.wait()
            self._changed.clear()
            try:
                if self.policy.wanted and self._tag is None:
                    await self._subscribe()
                elif not self.policy.wanted and self._tag is not None:
                    await self._unsubscribe()
            except Exception as exc:  # best effort: the base window serves on without it
                # The connection is in trouble: the next decision tries again, and a consumer
                # the robust connection restores is still ours to cancel.
                log.warning("burst window not changed", error=f"{type(exc).__name__}: {exc}")

    async def _subscribe(self) -> None:
        assert self._queue is not None
        self._tag = await self._queue.consume(self._deliver, arguments={"x-priority": PRIORITY})
        self._metrics.prefetch_window.set(self._base_prefetch + self._prefetch)
        self._metrics.burst_changes.labels(change="opened").inc()
        log.debug("burst window opened", prefetch=self._base_prefetch + self._prefetch)

    async def _unsubscribe(self) -> None:
        assert self._queue is not None
        assert self._tag is not None
        tag, self._tag = self._tag, None  # cancelled for good even if the broker never answers
        self._metrics.prefetch_window.set(self._base_prefetch)
        self._metrics.burst_changes.labels(change="closed").inc()
        log.debug("burst window closed", prefetch=self._base_prefetch)
        await asyncio.wait_for(self._queue.cancel(tag), CANCEL_TIMEOUT)

    async def close(self) -> None:
        """Stop taking deliveries on the burst consumer (the service is draining)."""
        self.policy.stop()
        if self._tick is not None:
            self._tick.cancel()
            self._tick = None
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._tag is not None:
            with contextlib.suppress(Exception):
                await self._unsubscribe()
