"""`deployflag submit`: publish requests as the upstream would, and optionally wait for replies."""

from __future__ import annotations

import sys
import time
import uuid

import aio_pika
import orjson

from deployflag import exitcodes
from deployflag.broker import topology
from deployflag.broker.connection import connect
from deployflag.messages import CELERY_EMBED
from deployflag.settings import Settings


def celery_message(payload: bytes, task_name: str, task_id: str) -> aio_pika.Message:
    """A Celery protocol-2 task message, as `app.send_task(name, args=[payload])` sends it."""
    body = b"[[" + payload + b"], {}, " + orjson.dumps(CELERY_EMBED) + b"]"
    return aio_pika.Message(
        body=body,
        content_type="application/json",
        content_encoding="utf-8",
        correlation_id=task_id,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        headers={
            "lang": "py",
            "task": task_name,
            "id": task_id,
            "root_id": task_id,
            "parent_id": None,
            "retries": 0,
            "timelimit": [None, None],
            "argsrepr": "(<payload>,)",
            "kwargsrepr": "{}",
            "origin": "deployflag-submit",
        },
    )


async def submit(
    settings: Settings,
    payload: bytes,
    *,
    count: int,
    wait: bool,
    celery: bool,
    timeout: float,
    same_id: bool = False,
) -> int:
    connection = await connect(settings, name="submit")
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        declared = await topology.declare(channel, settings)
        reply_queue = (
            await channel.declare_queue(exclusive=True, auto_delete=True) if wait else None
        )
        shared_id = str(uuid.uuid4())
        ids = [shared_id if same_id else str(uuid.uuid4()) for _ in range(count)]
        started = time.perf_counter()
        for request_id in ids:
            if celery:
                message = celery_message(payload, settings.training_task_name, request_id)
            else:
                message = aio_pika.Message(
                    body=payload,
                    content_type="application/json",
                    message_id=request_id,
                    correlation_id=request_id,
                    reply_to=reply_queue.name if reply_queue else None,
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                    timestamp=time.time(),
                )
            await declared.exchange.publish(
                message, routing_key=settings.training_queue, mandatory=True
            )
        print(f"published {count} request(s) to {settings.training_queue}", file=sys.stderr)
        if reply_queue is None:
            return exitcodes.RET_OK
        expected = count
        received = 0
        try:
            async with reply_queue.iterator(timeout=timeout) as replies:
                async for reply in replies:
                    async with reply.process():
                        sys.stdout.buffer.write(reply.body + b"\n")
                        sys.stdout.flush()
                    received += 1
                    if received >= expected:
                        break
        except TimeoutError:
            print(f"timed out: {received} of {expected} replies", file=sys.stderr)
            return exitcodes.RET_ERROR
        seconds = time.perf_counter() - started
        print(f"{received} replies in {seconds:.2f} s", file=sys.stderr)
        return exitcodes.RET_OK
