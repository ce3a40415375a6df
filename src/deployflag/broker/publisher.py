"""Confirmed, mandatory publishing of replies and parked messages (docs/protocol.md).

Every publish waits for the broker's confirm. ``mandatory`` makes an unroutable message an error
(the original published results to a routing key nothing was bound to, and the broker dropped
them without a word).
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractIncomingMessage
from aio_pika.exceptions import DeliveryError, PublishError

from deployflag.messages import Reply
from deployflag.poison import encodable_headers
from deployflag.settings import Settings

MAX_ERROR_HEADER = 2000  # characters of the error kept in x-deployflag-error
PUBLISH_TIMEOUT = 30.0  # seconds for one publish, confirm included


class Unroutable(Exception):
    """The broker returned or refused the message: nothing is bound to that routing key."""


class Publisher:
    def __init__(self, channel: AbstractChannel, exchange: AbstractExchange, settings: Settings):
        self._channel = channel
        self._exchange = exchange
        self._settings = settings

    async def _publish(
        self, message: aio_pika.Message, routing_key: str, *, default_exchange: bool = False
    ) -> None:
        exchange = self._channel.default_exchange if default_exchange else self._exchange
        try:
            # aiormq's own timeout covers the wait for the confirm, not the wait for the frames
            # to be written: a publish that raced a reconnect onto the dead connection waited on
            # that for ever (found by the broker-restart fault scenario). Bound all of it.
            await asyncio.wait_for(
                exchange.publish(
                    message, routing_key=routing_key, mandatory=True, timeout=PUBLISH_TIMEOUT
                ),
                PUBLISH_TIMEOUT,
            )
        except (DeliveryError, PublishError) as exc:
            raise Unroutable(f"{routing_key!r}: {exc}") from None

    async def reply(self, reply: Reply, *, correlation_id: str, reply_to: str | None) -> None:
        message = aio_pika.Message(
            body=reply.body,
            headers=reply.headers,
            content_type=reply.content_type,
            content_encoding="utf-8",
            correlation_id=correlation_id,
            message_id=reply.headers.get("id") or correlation_id,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            timestamp=datetime.now(UTC),
        )
        if reply_to:
            await self._publish(message, reply_to, default_exchange=True)
        else:
            await self._publish(message, self._settings.result_queue)

    async def park(
        self,
        original: AbstractIncomingMessage,
        *,
        request_id: str | None,
        reason: str,
        error: str,
    ) -> None:
        """Copy the message to the failed queue with the reason in its headers."""
        # The original headers, made encodable again and bounded in size (never dropped).
        headers = encodable_headers(
            original.headers,
            {
                "x-deployflag-reason": reason,
                "x-deployflag-error": error[:MAX_ERROR_HEADER],
                "x-deployflag-request-id": request_id,
                "x-deployflag-parked-at": datetime.now(UTC).isoformat(),
                "x-deployflag-original-routing-key": original.routing_key,
            },
        )
        message = aio_pika.Message(
            body=original.body,
            headers=headers,
            content_type=original.content_type,
            content_encoding=original.content_encoding,
            correlation_id=original.correlation_id,
            message_id=original.message_id,
            reply_to=original.reply_to,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            timestamp=datetime.now(UTC),
        )
        await self._publish(message, self._settings.failed_queue)
