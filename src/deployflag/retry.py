"""Retry a call in place while its trouble is transient: capped exponential backoff.

No side effects of its own beyond the log line: what a failure means (database health, a
counter) is the caller's ``on_failure``. Between tries it asks the caller whether the work is
still wanted (``check``), and gives up with :class:`~deployflag.delivery.Abandon` when the service
is stopping.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from deployflag import logs
from deployflag.delivery import Abandon

T = TypeVar("T")
log = logs.get_logger("deployflag.retry")


@dataclass(frozen=True)
class Backoff:
    initial: float
    maximum: float


async def retry(
    call: Callable[[], Awaitable[T]],
    *,
    stage: str,
    retryable: tuple[type[BaseException], ...],
    backoff: Backoff,
    stopping: asyncio.Event,
    check: Callable[[], None],
    on_failure: Callable[[BaseException], None],
) -> T:
    """``await call()`` until it returns; a ``retryable`` exception waits and tries again.

    Anything else propagates at once. While waiting, a set ``stopping`` ends the wait early.
    """
    delay = backoff.initial
    while True:
        try:
            return await call()
        except retryable as exc:
            error = exc
        on_failure(error)
        log.warning("transient failure", stage=stage, error=str(error), retry_in=delay)
        if stopping.is_set():
            raise Abandon(f"{stage} failed while stopping: {error}")
        check()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopping.wait(), delay)
        delay = min(delay * 2, backoff.maximum)
