"""One AMQP delivery as the handler sees it: its body, what was learnt about it, how to settle it.

The handler passes one :class:`Delivery` through its stages instead of the raw message, so every
stage can ask whether the delivery is still worth working on, and the envelope decoded once
travels with it (to the pool, to the park).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from aio_pika.abc import AbstractIncomingMessage
from aio_pika.exceptions import AMQPError, ChannelInvalidStateError

from deployflag import worker
from deployflag.messages import Envelope, Reply, TrainingResult
from deployflag.observer import Trace

# What a broker operation raises when the connection or channel is in trouble.
BROKER_ERRORS = (AMQPError, ChannelInvalidStateError, ConnectionError, TimeoutError)
# aiormq waits, without a timeout, until an ack's frame is written: on a connection that died
# under it, for ever. Past this, the ack counts as failed (the broker redelivers).
SETTLE_TIMEOUT = 10.0


class Abandon(Exception):
    """Stop handling this delivery without settling it here; the broker will deliver it again."""


@dataclass
class Delivery:
    message: AbstractIncomingMessage
    trace: Trace
    envelope: Envelope | None = None  # once the envelope stage has recognised it
    presumed: bool = False  # the envelope was inferred from the properties (worker.presume_json)
    _job: worker.Job | None = field(default=None, repr=False)
    # The reply, encoded once (its size is checked before the result is recorded), and the
    # result it encodes: the same bytes are published.
    _reply: tuple[TrainingResult, Reply] | None = field(default=None, repr=False)

    @property
    def size(self) -> int:
        return len(self.message.body)

    @property
    def redelivered(self) -> bool:
        return bool(self.message.redelivered)

    def job(self) -> worker.Job:
        """What a worker needs of this delivery: small, picklable, the envelope included."""
        m = self.message
        if self._job is None or self._job.envelope != self.envelope:
            headers = dict(m.headers or {})
            self._job = worker.Job(
                m.body, headers, m.message_id, m.content_type, self.envelope, self.presumed
            )
        return self._job

    def reply_to(self, result: TrainingResult) -> Reply | None:
        """The reply already encoded for ``result`` (the same object), if any."""
        if self._reply is not None and self._reply[0] is result:
            return self._reply[1]
        return None

    def keep_reply(self, result: TrainingResult, reply: Reply) -> None:
        self._reply = (result, reply)

    def channel_gone(self) -> bool:
        """Whether the channel it came on is closed (aio-pika's ``message.channel`` raises
        instead of answering once it is)."""
        try:
            return bool(self.message.channel.is_closed)
        except ChannelInvalidStateError:
            return True

    def check_alive(self) -> None:
        if self.channel_gone():
            raise Abandon("the delivery's channel closed; the broker redelivers it")

    async def ack(self) -> None:
        self.check_alive()
        try:
            await asyncio.wait_for(self.message.ack(), SETTLE_TIMEOUT)
        except BROKER_ERRORS as exc:
            # The channel went away after the work was recorded: the redelivered copy will
            # find the stored result and only re-publish it.
            raise Abandon(f"ack failed: {exc}") from None

    async def requeue(self) -> None:
        """Nack with requeue, best effort; a closed channel hands the delivery back by itself."""
        if self.message.processed or self.channel_gone():
            return
        with contextlib.suppress(*BROKER_ERRORS):
            await asyncio.wait_for(self.message.nack(requeue=True), SETTLE_TIMEOUT)


class OneCopyAtATime:
    """Claim, train and record one copy of a request at a time in this process.

    A second copy arrives while the first is still training when the first one's channel
    closed under it (consumer_timeout, a reconnect) or the request was published twice. It
    waits here instead of claiming — which would spend an attempt and train again in
    parallel — and then finds the stored result. Only the expensive part is exclusive: the
    reply and the ack of either copy never wait for the other.
    """

    def __init__(self) -> None:
        self._running: dict[str, asyncio.Event] = {}  # request ids being handled here

    @contextlib.asynccontextmanager
    async def exclusive(self, d: Delivery, request_id: str) -> AsyncIterator[bool]:
        """Yields whether this copy had to wait for another (then most likely a duplicate)."""
        waited = False
        while (running := self._running.get(request_id)) is not None:
            waited = True
            await d.trace.timed("claim", running.wait())
            d.check_alive()
        done = asyncio.Event()
        self._running[request_id] = done
        try:
            yield waited
        finally:
            del self._running[request_id]
            done.set()
