"""The exchange and queues (docs/protocol.md), declared identically by every instance.

Queues carry no arguments by default, so an upstream that declares the same queues plainly does not
collide (PRECONDITION_FAILED); dead-lettering and length limits belong in RabbitMQ policies.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractExchange

from deployflag.settings import Settings


@dataclass(frozen=True)
class Topology:
    exchange: AbstractExchange


def queue_arguments(settings: Settings) -> dict[str, Any] | None:
    return {"x-queue-type": "quorum"} if settings.queue_type == "quorum" else None


async def declare(channel: AbstractChannel, settings: Settings) -> Topology:
    exchange = await channel.declare_exchange(
        settings.exchange, aio_pika.ExchangeType.DIRECT, durable=True
    )
    arguments = queue_arguments(settings)
    for name in (
        settings.collect_queue,
        settings.training_queue,
        settings.result_queue,
        settings.failed_queue,
    ):
        queue = await channel.declare_queue(name, durable=True, arguments=arguments)
        await queue.bind(exchange, routing_key=name)
    return Topology(exchange=exchange)
