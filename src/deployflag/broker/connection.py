"""One robust connection per process: it reconnects, re-declares and re-consumes by itself.

With several node URLs (a cluster), the first connection tries them in list order until one
answers, and every reconnection after a lost node goes to the next one (broker/failover.py).
"""

from __future__ import annotations

import socket
import ssl

import aio_pika
from aio_pika.abc import AbstractRobustConnection

from deployflag import __version__, logs, tls
from deployflag.broker import tolerant
from deployflag.broker.failover import failover_class
from deployflag.broker.nodes import NodeRing
from deployflag.redaction import redact
from deployflag.settings import Settings

log = logs.get_logger("deployflag.broker")


def ssl_context(settings: Settings) -> ssl.SSLContext | None:
    """The verifying context for ``amqps://`` URLs (None for ``amqp://``; all nodes agree)."""
    if not settings.broker_url.startswith("amqps://"):
        return None
    return tls.broker_context(
        settings.amqp_ca_file, settings.amqp_cert_file, settings.amqp_key_file
    )


def _with_auth(url: str, settings: Settings) -> str:
    # aiormq picks the SASL mechanism from its ``auth`` parameter.
    if settings.amqp_auth == "external":
        url += ("&" if "?" in url else "?") + "auth=external"
    return url


def connection_urls(settings: Settings) -> list[str]:
    """The URLs handed to aio-pika, one per node, in the operator's order."""
    return [_with_auth(url, settings) for url in settings.broker_urls]


def connection_url(settings: Settings) -> str:
    """The first node's URL as handed to aio-pika."""
    return connection_urls(settings)[0]


def node_refused(exc: BaseException) -> bool:
    """The node answered and said no (credentials, certificate): the nodes of a cluster share
    those, so the next node would say the same."""
    text = str(exc)
    return (
        "ACCESS_REFUSED" in text
        or "authentication" in text.lower()
        or tls.tls_failure(exc) is not None
    )


async def connect(settings: Settings, *, name: str = "serve") -> AbstractRobustConnection:
    # A property pamqp cannot decode must not kill the connection (and wedge the queue).
    tolerant.install()
    urls = connection_urls(settings)
    for start in range(len(urls)):
        ring = NodeRing(urls, start)  # one per attempt: a failed connection keeps none
        try:
            return await aio_pika.connect_robust(
                ring.current,
                timeout=10,
                ssl_context=ssl_context(settings),
                client_properties={
                    "connection_name": f"deployflag-{name}@{socket.gethostname()}",
                    "product": "deployflag",
                    "version": __version__,
                },
                connection_class=failover_class(ring),
            )
        except Exception as exc:
            if start == len(urls) - 1 or node_refused(exc):
                raise
            log.warning(
                "broker node unreachable; trying the next",
                node=redact(ring.current),
                error=redact(str(exc)),
            )
    raise AssertionError("no node URL")  # settings always hold one
