"""``deployflag healthcheck``: ask the running service's ``/readyz``; exit 0 when ready, else 1.

Made for Docker's ``HEALTHCHECK`` and similar probes: stdlib urllib, one request, one line on
stderr when something is wrong.
"""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from deployflag.settings import Settings

# A wildcard bind is not an address to connect to; ask the loopback of the same family instead.
# (asyncio binds "::" IPv6-only, so an IPv4 loopback would not reach it.)
_CONNECT_HOST = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1", "[::]": "::1"}


def readyz_url(settings: Settings) -> str:
    host = settings.http_host.strip()
    host = _CONNECT_HOST.get(host, host)
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{settings.http_port}/readyz"


def _not_ready_reason(body: bytes) -> str:
    try:
        checks = json.loads(body)["checks"]
    except (ValueError, KeyError, TypeError):
        return "not ready"
    missing = [name for name in ("consumer", "database", "pool") if not checks.get(name)]
    if checks.get("draining"):
        missing.append("draining")
    return "not ready: " + ", ".join(missing) if missing else "not ready"


def check(settings: Settings, timeout: float = 3.0, *, stderr: TextIO | None = None) -> int:
    """0 when ``/readyz`` answers 200 within ``timeout`` seconds, else 1 and one stderr line."""
    err = sys.stderr if stderr is None else stderr
    if settings.http_port == 0:
        print("healthcheck: the HTTP endpoint is off (DEPLOYFLAG_HTTP_PORT=0)", file=err)
        return 1
    url = readyz_url(settings)
    # No proxies: an HTTP_PROXY in a container's environment must not capture a loopback probe.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout) as response:
            status = response.status
    except urllib.error.HTTPError as exc:
        with exc:
            body = exc.read()
        print(f"healthcheck: {url}: {exc.code} {_not_ready_reason(body)}", file=err)
        return 1
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, TimeoutError):
            print(f"healthcheck: {url}: no answer within {timeout:g} s", file=err)
        else:
            print(f"healthcheck: {url}: cannot connect ({exc.reason})", file=err)
        return 1
    except TimeoutError:
        print(f"healthcheck: {url}: no answer within {timeout:g} s", file=err)
        return 1
    except OSError as exc:
        print(f"healthcheck: {url}: {exc}", file=err)
        return 1
    if status != 200:
        print(f"healthcheck: {url}: unexpected status {status}", file=err)
        return 1
    return 0
