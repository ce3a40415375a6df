"""Connection limits for the health endpoint: a cap on open connections and an idle timeout.

aiohttp's server keeps a connection that never sends a request open for ever and accepts as many
as the process has file descriptors: a thousand idle connections to the health port used up the
open-files limit, so probes (and the broker and database sockets) failed. Each accepted
connection here goes through :class:`GuardedProtocol`: at ``max_connections`` the connection
that has been silent longest is closed to make room (so a probe always gets in, however many
idle connections someone opens), and a connection that has received nothing for
``idle_timeout`` seconds is closed (a probe or a scrape sends its request within milliseconds;
keep-alive connections that keep asking stay).
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from deployflag import logs

log = logs.get_logger("deployflag.http")


@dataclass
class ConnectionLimits:
    max_connections: int
    idle_timeout: float
    evicted: int = 0
    # Open connections, the longest silent first.
    connections: OrderedDict[GuardedProtocol, None] = field(default_factory=OrderedDict)


class GuardedProtocol(asyncio.Protocol):
    """Forwards to aiohttp's request handler; enforces :class:`ConnectionLimits`."""

    def __init__(self, inner: Any, limits: ConnectionLimits) -> None:
        self._inner = inner
        self._limits = limits
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._counted = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        limits = self._limits
        while len(limits.connections) >= limits.max_connections:
            oldest, _ = limits.connections.popitem(last=False)
            oldest.close_now()
            limits.evicted += 1
            if limits.evicted == 1 or limits.evicted % 1000 == 0:  # a flood logs a few lines
                log.warning(
                    "health endpoint at its connection limit: closing the most idle ones",
                    limit=limits.max_connections,
                    closed=limits.evicted,
                )
        limits.connections[self] = None
        self._counted = True
        self._transport = transport
        self._arm()
        self._inner.connection_made(transport)

    def _arm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        transport = self._transport
        if transport is not None:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(self._limits.idle_timeout, transport.close)

    def close_now(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    def data_received(self, data: bytes) -> None:
        self._arm()
        if self in self._limits.connections:
            self._limits.connections.move_to_end(self)
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        result = self._inner.eof_received()
        return bool(result) if result is not None else None

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._counted:
            return
        self._counted = False
        self._limits.connections.pop(self, None)
        if self._timer is not None:
            self._timer.cancel()
        self._inner.connection_lost(exc)


class GuardedTCPSite(web.TCPSite):
    """``web.TCPSite`` whose connections go through :class:`GuardedProtocol`."""

    __slots__ = ("limits",)

    def __init__(self, runner: web.BaseRunner, host: str, port: int, limits: ConnectionLimits):
        super().__init__(runner, host, port)
        self.limits = limits

    async def start(self) -> None:
        await web.BaseSite.start(self)
        server = self._runner.server
        assert server is not None
        limits = self.limits
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: GuardedProtocol(server(), limits),
            self._host,
            self._port,
            backlog=self._backlog,
            reuse_address=self._reuse_address,
            reuse_port=self._reuse_port,
        )
