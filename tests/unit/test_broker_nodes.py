"""Several broker node URLs: parsing, validation, redaction, and the rotation on reconnect."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from typing import Any

import pytest
from aio_pika.abc import UnderlayConnection
from yarl import URL

from deployflag.broker import connection as broker_connection
from deployflag.broker import tolerant
from deployflag.broker.nodes import NodeRing, check_urls, describe, split_urls
from deployflag.settings import ConfigError, load_settings
from tests.support.toolkit import async_wait_until

SECRET = "s3cr3t-pw"
N1 = f"amqp://app:{SECRET}@node1:5672/vh"
N2 = f"amqp://app:{SECRET}@node2:5673/vh"
N3 = f"amqp://app:{SECRET}@node3/vh"


# --- parsing ---------------------------------------------------------------------------------


def test_one_url_is_a_list_of_one() -> None:
    assert split_urls(N1) == [N1]


@pytest.mark.parametrize(
    "text",
    [f"{N1},{N2},{N3}", f"{N1}, {N2} ,\t{N3}", f"{N1};{N2};{N3}", f" {N1} ; {N2},{N3} "],
)
def test_commas_and_semicolons_separate_node_urls(text: str) -> None:
    assert split_urls(text) == [N1, N2, N3]


def test_a_comma_in_a_password_does_not_split() -> None:
    one = "amqp://app:pa,ss@node1/vh"
    assert split_urls(f"{one},{N2}") == [one, N2]


# --- validation ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (f"{N1},{N2},", "a comma after the host"),
        (f"{N1};;{N2}", "node 2 of 3: empty"),
        (f"{N1};", "node 2 of 2: empty"),
        ("amqp://app@node1/vh,node2:5672/vh", "a comma after the host"),
        (f"{N1},amqps://app:{SECRET}@node2/vh", "every node takes TLS (amqps://) or none does"),
        (f"{N1},amqp://app:{SECRET}@node2/other", "names the vhost 'other', node 1 'vh'"),
        (f"{N1},{N2}?heartbeat=5", "other query parameters than node 1"),
        (f"{N1},{N2},amqp://app:{SECRET}@NODE1:5672/vh", "node 3 of 3 repeats node 1 (node1)"),
        (f"{N1};http://node2/vh", "node 2 of 2: must start with amqp:// or amqps://"),
        (f"amqp://app:{SECRET}@node1:56x2/vh", "the port is not a number"),
        ("amqp:///vh", "no host in the URL"),
    ],
)
def test_bad_lists_are_refused_with_a_clear_message(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)) as caught:
        check_urls(split_urls(text))
    assert SECRET not in str(caught.value)


def test_a_semicolon_in_a_password_is_refused_without_showing_any_of_it() -> None:
    with pytest.raises(ValueError, match="percent-encode a semicolon") as caught:
        check_urls(split_urls("amqp://app:ab12;cd@node1/vh"))
    assert "ab12" not in str(caught.value)
    assert "cd@" not in str(caught.value)


def test_a_good_list_passes() -> None:
    check_urls([N1, N2, N3])
    check_urls(["amqp://node1"])  # no user, no vhost: aio-pika's defaults


# --- settings ---------------------------------------------------------------------------------


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in ("DEPLOYFLAG_AMQP_URL", "CELERY_BROKER_URL", "DEPLOYFLAG_AMQP_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DEPLOYFLAG_SECRETS_DIR", "")
    return monkeypatch


def test_settings_hold_every_node_first_one_first(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("DEPLOYFLAG_AMQP_URL", f"{N1}, {N2}, {N3}")
    s = load_settings()
    assert s.broker_urls == (N1, N2, N3)
    assert s.broker_url == N1


def test_the_single_url_form_is_unchanged(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("DEPLOYFLAG_AMQP_URL", N1)
    s = load_settings()
    assert s.broker_urls == (N1,)
    assert s.broker_url == N1
    assert s.describe()["amqp_nodes"] == 1


def test_celery_style_semicolons_in_the_legacy_variable(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("CELERY_BROKER_URL", f"{N1};{N2}")
    assert load_settings().broker_urls == (N1, N2)


def test_describe_redacts_the_password_of_every_node(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("DEPLOYFLAG_AMQP_URL", f"{N1},{N2},{N3}")
    summary = load_settings().describe()
    assert SECRET not in repr(summary)
    assert summary["amqp_url"] == (
        "amqp://app:***@node1:5672/vh,amqp://app:***@node2:5673/vh,amqp://app:***@node3/vh"
    )
    assert summary["amqp_nodes"] == 3
    assert describe([N1]) == "amqp://app:***@node1:5672/vh"


def test_the_password_setting_applies_to_every_node(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("DEPLOYFLAG_AMQP_URL", "amqp://app@node1/vh,amqp://app@node2/vh")
    clean_env.setenv("DEPLOYFLAG_AMQP_PASSWORD", "p@ss;word")
    assert load_settings().broker_urls == (
        "amqp://app:p%40ss%3Bword@node1/vh",
        "amqp://app:p%40ss%3Bword@node2/vh",
    )


def test_a_bad_list_is_a_config_error_naming_the_variable(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("DEPLOYFLAG_AMQP_URL", f"{N1},amqp://app:{SECRET}@node2/elsewhere")
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert str(caught.value).startswith("DEPLOYFLAG_AMQP_URL: node 2 of 2 names the vhost")
    assert SECRET not in str(caught.value)


def test_every_node_gets_the_external_auth_parameter(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("DEPLOYFLAG_AMQP_URL", f"{N1},{N2}")
    s = load_settings()
    assert broker_connection.connection_urls(s) == [N1, N2]
    external = s.model_copy(update={"amqp_auth": "external"})
    assert broker_connection.connection_urls(external) == [
        f"{N1}?auth=external",
        f"{N2}?auth=external",
    ]


# --- rotation ---------------------------------------------------------------------------------


def test_the_ring_starts_where_told_and_wraps() -> None:
    ring = NodeRing([N1, N2, N3], start=1)
    assert ring.current == N2
    assert [ring.advance(), ring.advance(), ring.advance()] == [N3, N1, N2]
    assert len(ring) == 3
    with pytest.raises(ValueError, match="no node URLs"):
        NodeRing([])


class FakeAmqp:
    """What aio-pika needs of an aiormq connection; ``lose()`` drops it like a killed node."""

    def __init__(self) -> None:
        self.closing: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.is_closed = False

    async def ready(self) -> None:
        return None

    def lose(self) -> None:
        self.is_closed = True
        self.closing.set_exception(ConnectionResetError("node killed"))

    async def close(self, exc: Any = None) -> None:
        if not self.closing.done():
            self.is_closed = True
            self.closing.set_result(None)


class FakeCluster:
    """Stands in for the network below aio-pika: which node each attempt went to, which are up."""

    def __init__(self, down: set[str]) -> None:
        self.down = down
        self.attempts: list[str] = []
        self.live: dict[str, FakeAmqp] = {}

    async def make_connection(self, url: URL, timeout: Any = None, **kwargs: Any) -> FakeAmqp:
        host = url.host or ""
        self.attempts.append(host)
        if host in self.down:
            raise ConnectionRefusedError(111, f"Connect call failed ({host})")
        self.live[host] = FakeAmqp()
        return self.live[host]


@pytest.fixture
def fake_cluster(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeCluster]:
    fake = FakeCluster(down=set())

    async def make_connection(cls: Any, url: URL, timeout: Any = None, **kw: Any) -> FakeAmqp:
        return await fake.make_connection(url, timeout, **kw)

    monkeypatch.setattr(UnderlayConnection, "make_connection", classmethod(make_connection))
    was_tolerant = tolerant.installed()
    yield fake
    if not was_tolerant:  # connect() installs the tolerant decoder: leave the process as found
        tolerant.uninstall()


async def _wait_for(condition: Any, what: str) -> None:
    await async_wait_until(condition, 5, what, every=0.01)


async def test_start_up_skips_a_node_that_is_down(
    fake_cluster: FakeCluster, clean_env: pytest.MonkeyPatch
) -> None:
    fake_cluster.down = {"node1"}
    clean_env.setenv("DEPLOYFLAG_AMQP_URL", f"{N1},{N2},{N3}")
    connection = await broker_connection.connect(load_settings())
    try:
        assert fake_cluster.attempts == ["node1", "node2"]
        assert connection.url.host == "node2"
    finally:
        await connection.close()


async def test_every_node_down_raises_the_last_error(
    fake_cluster: FakeCluster, clean_env: pytest.MonkeyPatch
) -> None:
    fake_cluster.down = {"node1", "node2"}
    clean_env.setenv("DEPLOYFLAG_AMQP_URL", f"{N1},{N2}")
    with pytest.raises(ConnectionError, match="node2"):
        await broker_connection.connect(load_settings())
    assert fake_cluster.attempts == ["node1", "node2"]


async def test_refused_credentials_are_not_tried_on_the_next_node(
    fake_cluster: FakeCluster, clean_env: pytest.MonkeyPatch, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def refuse(cls: Any, url: URL, timeout: Any = None, **kw: Any) -> FakeAmqp:
        fake_cluster.attempts.append(url.host or "")
        raise ConnectionError("ACCESS_REFUSED - Login was refused")

    monkeypatch.setattr(UnderlayConnection, "make_connection", classmethod(refuse))
    clean_env.setenv("DEPLOYFLAG_AMQP_URL", f"{N1},{N2}")
    with pytest.raises(ConnectionError, match="ACCESS_REFUSED"):
        await broker_connection.connect(load_settings())
    assert fake_cluster.attempts == ["node1"]


async def test_a_lost_node_is_followed_by_the_next_and_a_down_one_skipped(
    fake_cluster: FakeCluster, clean_env: pytest.MonkeyPatch
) -> None:
    clean_env.setenv(
        "DEPLOYFLAG_AMQP_URL",
        ",".join(f"{url}?reconnect_interval=0.01" for url in (N1, N2, N3)),
    )
    connection = await broker_connection.connect(load_settings())
    reconnected: list[str] = []
    connection.reconnect_callbacks.add(lambda conn: reconnected.append(str(conn.url.host)))
    try:
        assert fake_cluster.attempts == ["node1"]
        # node1 dies while node2 is down too: node2 is tried, then node3 serves.
        fake_cluster.down = {"node1", "node2"}
        fake_cluster.live["node1"].lose()
        await _wait_for(lambda: reconnected == ["node3"], "a reconnection to node3")
        assert fake_cluster.attempts == ["node1", "node2", "node3"]
        # node3 dies, node1 is back: round-robin wraps to it.
        fake_cluster.down = {"node2", "node3"}
        fake_cluster.live["node3"].lose()
        await _wait_for(lambda: reconnected == ["node3", "node1"], "a reconnection to node1")
        assert fake_cluster.attempts == ["node1", "node2", "node3", "node1"]
        assert connection.url.host == "node1"
    finally:
        await connection.close()
    attempts = len(fake_cluster.attempts)
    await asyncio.sleep(0.05)  # closed on purpose: no attempt follows
    assert len(fake_cluster.attempts) == attempts


async def test_one_node_reconnects_to_itself(
    fake_cluster: FakeCluster, clean_env: pytest.MonkeyPatch
) -> None:
    clean_env.setenv("DEPLOYFLAG_AMQP_URL", f"{N1}?reconnect_interval=0.01")
    connection = await broker_connection.connect(load_settings())
    reconnected: list[str] = []
    connection.reconnect_callbacks.add(lambda conn: reconnected.append(str(conn.url.host)))
    try:
        fake_cluster.live["node1"].lose()
        await _wait_for(lambda: reconnected == ["node1"], "a reconnection")
        assert fake_cluster.attempts == ["node1", "node1"]
    finally:
        await connection.close()
