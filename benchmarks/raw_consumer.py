"""The ceiling of the broker path: an aio-pika consumer that only publishes a reply (confirmed,
persistent, ``correlation_id`` = the request's) and acks — no decoding, database or pool.

Run by bench_service.py; configured from BENCH_AMQP_URL, BENCH_EXCHANGE, BENCH_TRAINING_QUEUE,
BENCH_RESULT_QUEUE and BENCH_PREFETCH. Stops on SIGTERM.
"""

from __future__ import annotations

import asyncio
import os
import signal

import aio_pika
from aio_pika.abc import AbstractExchange, AbstractIncomingMessage

# About the size of the service's JSON reply for the worked example.
REPLY = b'{"status": "ok", "scores": [' + b'{"issue_shortcode": "PYL-W0611"},' * 12 + b"{}]}"


async def main() -> None:
    url = os.environ["BENCH_AMQP_URL"]
    exchange_name = os.environ["BENCH_EXCHANGE"]
    training = os.environ["BENCH_TRAINING_QUEUE"]
    result = os.environ["BENCH_RESULT_QUEUE"]
    prefetch = int(os.environ.get("BENCH_PREFETCH", "64"))

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)

    connection = await aio_pika.connect_robust(url)
    async with connection:
        consume = await connection.channel()
        await consume.set_qos(prefetch_count=prefetch)
        publish = await connection.channel(publisher_confirms=True)
        exchange = await publish.declare_exchange(
            exchange_name, aio_pika.ExchangeType.DIRECT, durable=True
        )
        queue = await consume.declare_queue(training, durable=True)
        await queue.bind(exchange_name, routing_key=training)
        tasks: set[asyncio.Task[None]] = set()

        async def on_message(message: AbstractIncomingMessage) -> None:
            task = asyncio.create_task(handle(exchange, result, message))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

        await queue.consume(on_message)
        await stop.wait()


async def handle(exchange: AbstractExchange, result: str, message: AbstractIncomingMessage) -> None:
    headers = message.headers or {}
    rid = headers.get("id") or message.correlation_id or message.message_id
    reply = aio_pika.Message(
        body=REPLY,
        content_type="application/json",
        correlation_id=str(rid),
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
    )
    await exchange.publish(reply, routing_key=result, mandatory=True)
    await message.ack()


if __name__ == "__main__":
    asyncio.run(main())
