"""A robust connection that moves to the next cluster node on every reconnection attempt.

aio-pika's robust connection reconnects to the one URL it was made with: after losing its node it
would retry that node until it comes back, while the rest of the cluster could serve. aio-pika has
no list of nodes and no hook per connection attempt (its issue #141 asks for one). What it does
in 9.x and 10.x alike is clear ``transport`` before every attempt, then connect to ``self.url``;
so :class:`FailoverConnection` turns ``transport`` into a property whose setter, on each attempt
after the first, moves ``url`` to the next node. Everything else — re-opening channels,
re-declaring, re-consuming, the reconnect interval — is aio-pika's own.
"""

from __future__ import annotations

from typing import Any, ClassVar

from aio_pika import RobustConnection
from aio_pika.abc import UnderlayConnection
from yarl import URL

from deployflag import logs
from deployflag.broker.nodes import NodeRing
from deployflag.redaction import redact

log = logs.get_logger("deployflag.broker")


class FailoverConnection(RobustConnection):
    """Set :attr:`ring` on a subclass (see :func:`failover_class`); the first attempt goes to the
    ring's current node, each later one to the next."""

    ring: ClassVar[NodeRing]
    _failover_attempted = False  # class default: the base __init__ clears transport first
    _failover_transport: UnderlayConnection | None = None

    def __init__(self, url: URL, *args: Any, **kwargs: Any) -> None:
        super().__init__(url, *args, **kwargs)
        self._failover_attempted = False

    @property
    def transport(self) -> UnderlayConnection | None:
        return self._failover_transport

    @transport.setter
    def transport(self, value: UnderlayConnection | None) -> None:
        # None: an attempt is about to start (or the connection is closing).
        if value is None and not self._close_called_safe():
            if self._failover_attempted and len(self.ring) > 1:
                self.url = URL(self.ring.advance())
                log.info("broker: trying the next node", node=redact(str(self.url)))
            self._failover_attempted = True
        self._failover_transport = value

    def _close_called_safe(self) -> bool:
        # Read while the base __init__ runs too, before it sets the flag.
        return bool(getattr(self, "_close_called", False))


def failover_class(ring: NodeRing) -> type[FailoverConnection]:
    """A :class:`FailoverConnection` bound to ``ring``, to pass as ``connection_class``."""
    return type("FailoverConnection", (FailoverConnection,), {"ring": ring})
