"""sd_notify(3) by hand: readiness, stopping and watchdog pings to systemd (``Type=notify``).

The protocol is one datagram of ``KEY=VALUE`` lines to the unix socket named by ``NOTIFY_SOCKET``
(a leading ``@`` means the Linux abstract namespace). A few lines of socket code; no dependency.
Outside systemd (no ``NOTIFY_SOCKET``) every call is a no-op that returns False.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Mapping
from typing import TYPE_CHECKING

import structlog

if TYPE_CHECKING:
    from deployflag.health import Health

log = structlog.get_logger(__name__)


def _address(path: str) -> str | None:
    if path.startswith("@"):
        return "\0" + path[1:]
    if path.startswith("/"):
        return path
    return None  # vsock: and other transports are not for a service on the host


def notify(message: str, env: Mapping[str, str] | None = None) -> bool:
    """Send ``message`` (e.g. ``"READY=1"``) to systemd; True when it was sent.

    Never blocks and never raises: a full or vanished socket only means False.
    """
    path = (os.environ if env is None else env).get("NOTIFY_SOCKET", "")
    address = _address(path) if path else None
    if address is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.setblocking(False)
            sock.connect(address)
            sock.sendall(message.encode())
    except OSError as exc:
        log.warning("sd_notify_failed", notify_socket=path, error=str(exc))
        return False
    return True


def watchdog_interval(env: Mapping[str, str] | None = None) -> float | None:
    """The watchdog timeout systemd set (``WatchdogSec=``), in seconds; None when off.

    Like sd_watchdog_enabled(3): ``WATCHDOG_USEC`` must be a positive integer, and when
    ``WATCHDOG_PID`` is set it must be this process. Ping at half this interval.
    """
    environ = os.environ if env is None else env
    usec = environ.get("WATCHDOG_USEC", "")
    try:
        micros = int(usec)
    except ValueError:
        return None
    if micros <= 0:
        return None
    pid = environ.get("WATCHDOG_PID", "")
    if pid:
        try:
            if int(pid) != os.getpid():
                return None
        except ValueError:
            return None
    return micros / 1_000_000


async def watchdog_task(health: Health, watchdog_seconds: float | None = None) -> None:
    """Send ``WATCHDOG=1`` every half watchdog interval while the event loop is healthy.

    Returns at once when systemd set no watchdog. The ping runs in the service's loop, so a
    blocked loop stops it by itself; a loop whose monitor has not ticked within the stall bound
    (``health.alive()``) withholds it too, and systemd restarts the service after ``WatchdogSec``.
    Cancel the task to stop.
    """
    timeout = watchdog_interval() if watchdog_seconds is None else watchdog_seconds
    if timeout is None:
        return
    period = timeout / 2
    withheld = False
    while True:
        if health.alive():
            notify("WATCHDOG=1")
            if withheld:
                log.info("watchdog_resumed")
            withheld = False
        elif not withheld:
            log.warning(
                "watchdog_withheld",
                seconds_since_tick=round(health.seconds_since_tick(), 3),
                stall_seconds=health.stall_seconds,
            )
            withheld = True
        await asyncio.sleep(period)
