"""The broker's node URLs: one, or a cluster's nodes given as a list.

``DEPLOYFLAG_AMQP_URL`` holds one URL or several, separated by commas (or semicolons, as Celery's
``broker_url`` does): ``amqp://u:p@node1:5672/vh,amqp://u:p@node2:5672/vh``. A comma separates
two URLs only where the next one starts (``amqp://`` or ``amqps://``), so a comma inside a
password still works. The nodes must agree on what is not per node — scheme (TLS for all or none),
vhost, query parameters — since the connection reads those from the first URL only.

Pure functions and a tiny rotation; the errors say what to fix and hold no password.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from urllib.parse import urlsplit

from deployflag.redaction import redact

VARIABLE = "DEPLOYFLAG_AMQP_URL"
_SEPARATOR = re.compile(r"\s*(?:;|,(?=\s*amqps?://))\s*")


def split_urls(text: str) -> list[str]:
    """The URLs in ``text``, in order (one URL gives a list of one)."""
    return _SEPARATOR.split(text.strip())


def _where(index: int, count: int) -> str:
    return "" if count == 1 else f"node {index} of {count}: "


def check_urls(urls: Sequence[str]) -> None:
    """Raise ``ValueError`` unless ``urls`` are usable node URLs of one broker or cluster."""
    count = len(urls)
    # A semicolon splits the list: one in a password cuts its URL in two.
    hint = " (percent-encode a semicolon in a password: %3B)" if count > 1 else ""
    for index, url in enumerate(urls, 1):
        where = _where(index, count)
        if not url:
            raise ValueError(f"{where}empty (a stray comma or semicolon in the list?)")
        if not url.startswith(("amqp://", "amqps://")):
            raise ValueError(f"{where}must start with amqp:// or amqps://{hint}")
        parts = urlsplit(url)
        hostinfo = parts.netloc.rpartition("@")[2]
        if "," in hostinfo or "," in parts.path or ";" in parts.path:
            raise ValueError(
                f"{where}a comma after the host ({redact(url)}): give every node as a whole URL "
                "(amqp://user:password@host:port/vhost), separated by commas"
            )
        try:
            parts.port  # noqa: B018 - parsing it is the check
        except ValueError:  # what stands for the port may be part of a password: not shown
            raise ValueError(f"{where}the port is not a number{hint}") from None
        if not parts.hostname:
            raise ValueError(f"{where}no host in the URL")
    if count == 1:
        return
    first = urlsplit(urls[0])
    seen: dict[tuple[str, int | None], int] = {}
    for index, url in enumerate(urls, 1):
        parts = urlsplit(url)
        if parts.scheme != first.scheme:
            raise ValueError(
                f"node {index} of {count} is {parts.scheme}://, node 1 {first.scheme}://: "
                "every node takes TLS (amqps://) or none does"
            )
        if parts.path != first.path:
            raise ValueError(
                f"node {index} of {count} names the vhost {parts.path[1:]!r}, node 1 "
                f"{first.path[1:]!r}: a cluster's nodes share one vhost"
            )
        if parts.query != first.query:
            raise ValueError(
                f"node {index} of {count} has other query parameters than node 1: the first "
                "node's apply to every node, give them all the same"
            )
        key = ((parts.hostname or "").lower(), parts.port)
        if key in seen:
            raise ValueError(f"node {index} of {count} repeats node {seen[key]} ({key[0]})")
        seen[key] = index


def describe(urls: Sequence[str]) -> str:
    """The URLs for a log line: passwords replaced, one URL at a time."""
    return ",".join(redact(url) for url in urls)


class NodeRing:
    """Which node a connection attempt goes to: the first, then round-robin in list order.

    The order is the operator's: list the nearest node first. Each instance keeps its own ring;
    instances that should spread over the nodes list them in different orders.
    """

    def __init__(self, urls: Sequence[str], start: int = 0) -> None:
        if not urls:
            raise ValueError("no node URLs")
        self.urls = tuple(urls)
        self.index = start % len(self.urls)

    @property
    def current(self) -> str:
        return self.urls[self.index]

    def advance(self) -> str:
        """Move to the next node and return its URL."""
        self.index = (self.index + 1) % len(self.urls)
        return self.current

    def __len__(self) -> int:
        return len(self.urls)
