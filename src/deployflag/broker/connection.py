"""One robust connection per process: it reconnects, re-declares and re-consumes by itself."""

from __future__ import annotations

import socket
import ssl

import aio_pika
from aio_pika.abc import AbstractRobustConnection

from deployflag import __version__, tls
from deployflag.broker import tolerant
from deployflag.settings import Settings


def ssl_context(settings: Settings) -> ssl.SSLContext | None:
    """The verifying context for an ``amqps://`` URL (None for ``amqp://``)."""
    if not settings.broker_url.startswith("amqps://"):
        return None
    return tls.broker_context(
        settings.amqp_ca_file, settings.amqp_cert_file, settings.amqp_key_file
    )


def connection_url(settings: Settings) -> str:
    """The URL handed to aio-pika: aiormq picks the SASL mechanism from its ``auth`` parameter."""
    url = settings.broker_url
    if settings.amqp_auth == "external":
        url += ("&" if "?" in url else "?") + "auth=external"
    return url


async def connect(settings: Settings, *, name: str = "serve") -> AbstractRobustConnection:
    # A property pamqp cannot decode must not kill the connection (and wedge the queue).
    tolerant.install()
    connection = await aio_pika.connect_robust(
        connection_url(settings),
        timeout=10,
        ssl_context=ssl_context(settings),
        client_properties={
            "connection_name": f"deployflag-{name}@{socket.gethostname()}",
            "product": "deployflag",
            "version": __version__,
        },
    )
    return connection
