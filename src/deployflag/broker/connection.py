"""One robust connection per process: it reconnects, re-declares and re-consumes by itself."""

from __future__ import annotations

import socket

import aio_pika
from aio_pika.abc import AbstractRobustConnection

from deployflag import __version__
from deployflag.broker import tolerant
from deployflag.settings import Settings


async def connect(settings: Settings, *, name: str = "serve") -> AbstractRobustConnection:
    # A property pamqp cannot decode must not kill the connection (and wedge the queue).
    tolerant.install()
    connection = await aio_pika.connect_robust(
        settings.broker_url,
        timeout=10,
        client_properties={
            "connection_name": f"deployflag-{name}@{socket.gethostname()}",
            "product": "deployflag",
            "version": __version__,
        },
    )
    return connection
