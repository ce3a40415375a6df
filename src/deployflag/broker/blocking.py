"""Notice when the broker blocks this connection (a memory or disk alarm) and say so.

During a resource alarm RabbitMQ sends ``connection.blocked`` and stops reading from every
connection that publishes: replies, acks and nacks all wait in the socket, so deliveries stay
unacked (on the broker they are safe, and the prefetch window bounds how many this instance
holds). Nothing here changes that; it only makes the state visible — ``/readyz`` answers 503 with
``checks.broker_blocked`` and ``deployflag_broker_blocked`` is 1 — and logs the change both ways.
When the alarm clears the broker sends ``connection.unblocked``, reads on, and work resumes.

aiormq tracks the state in a private event of its connection, with no callback; it is polled here
(a cheap attribute read) rather than reimplementing the frame handling.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from deployflag import logs

if TYPE_CHECKING:
    from aio_pika.abc import AbstractConnection

    from deployflag.health import Health
    from deployflag.metrics import Metrics

log = logs.get_logger("deployflag.broker")

POLL_INTERVAL = 0.5  # seconds
_UNBLOCKED = "_Connection__connection_unblocked"  # aiormq.Connection's (name-mangled) event


def is_blocked(connection: AbstractConnection) -> bool | None:
    """True while the broker blocks ``connection``; None when that cannot be told (no transport
    right now, or an aiormq without the event)."""
    transport: Any = getattr(connection, "transport", None)
    amqp = getattr(transport, "connection", None)
    event = getattr(amqp, _UNBLOCKED, None)
    if not isinstance(event, asyncio.Event):
        return None
    if not getattr(amqp, "is_opened", False):
        return None
    return not event.is_set()


async def watch_blocked(
    connection: AbstractConnection,
    health: Health,
    metrics: Metrics,
    interval: float = POLL_INTERVAL,
) -> None:
    """Mirror the connection's blocked state into health and metrics until cancelled."""
    while True:
        blocked = is_blocked(connection)
        if blocked is None:
            blocked = False  # reconnecting: the connection-lost state already says not ready
        if blocked != health.broker_blocked:
            if blocked:
                log.warning("broker blocked this connection (resource alarm): replies wait")
            else:
                log.info("broker unblocked this connection")
            health.broker_blocked = blocked
            metrics.broker_blocked.set(1 if blocked else 0)
        await asyncio.sleep(interval)
