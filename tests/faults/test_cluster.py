"""A RabbitMQ cluster loses the node holding the quorum queues' leader, 300 requests in flight.

Three nodes (tests/support/cluster.py), ``DEPLOYFLAG_QUEUE_TYPE=quorum``, and the service given all
three node URLs with the leader's node first, so the kill takes its connection and the queues'
leader at once — the hard case. The node is SIGKILLed (no goodbye to its peers or its clients):
the remaining two elect new leaders, the service reconnects to the next node in its list and
serves from there while the killed node is still down; then the node is restarted and rejoins.
Every request is answered or parked, none lost, none trained twice.

RabbitMQ 3.10 sometimes keeps a few deliveries checked out to the killed node's consumer after the
election and never redelivers them, or keeps counting that consumer (see
:func:`wait_or_release_orphans` and :func:`consumers_registered`): the test proves that broker
state before it applies the operator's remedy, and the fault table says so.

The upstream's side (the tally) is connected to a node that is not killed.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import aio_pika
import pytest

from tests.faults.conftest import FaultTable
from tests.faults.harness import QUEUE_KINDS, Tally, consumers_of, queue_counts
from tests.support.broker import Names, ServiceProcess
from tests.support.cluster import Checkouts, ClusterError, ClusterNode, RabbitCluster
from tests.support.toolkit import TimedOut, async_wait_until

pytestmark = [pytest.mark.faults, pytest.mark.timeout(420), pytest.mark.rabbitmq]

ROOT = Path(__file__).resolve().parents[2]
WORKED = (ROOT / "examples" / "worked-example.json").read_bytes()
REQUESTS = 300
QUORUM = {"x-queue-type": "quorum"}


@pytest.fixture(scope="module")
def cluster() -> Iterator[RabbitCluster]:
    try:
        nodes = RabbitCluster(3)
    except ClusterError as exc:
        pytest.fail(f"cannot run a RabbitMQ cluster here: {exc}", pytrace=False)
    with nodes as running:  # every node stopped afterwards, also when the start fails
        yield running


@pytest.fixture(scope="module")
def cluster_vhost(cluster: RabbitCluster) -> str:
    name = f"deployflag-cluster-{uuid.uuid4().hex[:8]}"
    cluster.ctl(cluster.nodes[0], "add_vhost", name)
    cluster.ctl(cluster.nodes[0], "set_permissions", "-p", name, "guest", ".*", ".*", ".*")
    return name


@pytest.fixture
def rabbit_url(cluster: RabbitCluster, cluster_vhost: str) -> str:
    """tests/support's fixtures (``service_env``) on the cluster's first node, not the shared or
    the fault suite's single broker."""
    return cluster.nodes[0].url(cluster_vhost)


async def declare_quorum_queues(url: str, names: Names) -> None:
    """The topology, declared as the service declares it, on one node: with RabbitMQ's default
    (client-local) the queues' leaders are on that node."""
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel()
        exchange = await channel.declare_exchange(
            names.exchange, aio_pika.ExchangeType.DIRECT, durable=True
        )
        for kind in QUEUE_KINDS:
            queue = await channel.declare_queue(names.queue(kind), durable=True, arguments=QUORUM)
            await queue.bind(exchange, names.queue(kind))
    finally:
        await connection.close()


def connected_ports(cluster: RabbitCluster, ask: ClusterNode, vhost: str) -> list[int]:
    """The node ports of the vhost's client connections (``client:port -> node:port``)."""
    text = cluster.ctl(ask, "list_connections", "-p", vhost, "name")
    # list_connections shows the vhost's connections on every node; each name ends in the port
    # the client connected to.
    return [int(port) for port in re.findall(r"-> [\d.]+:(\d+)", text)]


def new_leader(
    cluster: RabbitCluster, vhost: str, queue: str, ask: ClusterNode, old: ClusterNode
) -> ClusterNode | None:
    """The queue's leader once it is another node than ``old``; None while ``ask`` still names
    ``old``, names none, or cannot say (an election)."""
    try:
        leader = cluster.leader(vhost, queue, ask)
    except (ClusterError, subprocess.TimeoutExpired):
        return None
    return None if leader is old else leader


def all_running(cluster: RabbitCluster, ask: ClusterNode) -> bool:
    try:
        running = cluster.running_nodes(ask)
    except (ClusterError, subprocess.TimeoutExpired):
        return False
    return sorted(running) == sorted(node.name for node in cluster.nodes)


async def wait_or_move_leader(
    wait: Callable[[], Awaitable[object]],
    cluster: RabbitCluster,
    vhost: str,
    queue: str,
    ask: ClusterNode,
    stuck: Callable[[Checkouts], bool],
    stalled: Callable[[Checkouts], Awaitable[str]],
) -> tuple[Checkouts, ClusterNode] | None:
    """Run ``wait``. When it times out and the broker is ``stuck`` in RabbitMQ 3.10's fault,
    move the queue's leader — the operator's remedy, which makes a new leader take stock of every
    consumer again — and run ``wait`` once more. Any other stall fails, with ``stalled``'s
    account of it. None when no remedy was needed; otherwise the broker's state before it and
    the node the leader moved to."""
    try:
        await wait()
        return None
    except TimedOut as exc:
        checkouts = await asyncio.to_thread(cluster.checkouts, vhost, queue, ask)
        if not stuck(checkouts):
            raise TimedOut(f"{exc}: {await stalled(checkouts)}") from None
    moved_to = await asyncio.to_thread(cluster.move_leader, vhost, queue, ask)
    try:
        await wait()
    except TimedOut as exc:
        after = await asyncio.to_thread(cluster.checkouts, vhost, queue, ask)
        raise TimedOut(
            f"{exc}, also after the leader moved to node {moved_to.index}: before {checkouts}, "
            f"after {after}; {await stalled(after)}"
        ) from None
    return checkouts, moved_to


async def wait_or_release_orphans(
    wait: Callable[[], Awaitable[object]],
    cluster: RabbitCluster,
    vhost: str,
    queue: str,
    ask: ClusterNode,
    stalled: Callable[[Checkouts], Awaitable[str]],
) -> str:
    """Run ``wait``. RabbitMQ 3.10 sometimes keeps a few deliveries checked out to the dead node's
    consumer after the election (the queue counts them unacked, no channel holds them, and it
    never redelivers them by itself), before the node is back or after: only in exactly that
    state is the leader moved. What the remedy did, for the fault table's row ("" when it was
    not needed)."""
    remedied = await wait_or_move_leader(
        wait, cluster, vhost, queue, ask, lambda checkouts: checkouts.orphaned, stalled
    )
    if remedied is None:
        return ""
    checkouts, moved_to = remedied
    return (
        f"RabbitMQ kept {checkouts.queue_unacked} deliveries checked out to no channel "
        f"({checkouts.ghosts} dead consumer(s) counted) until the queue's leader was moved to "
        f"node {moved_to.index}"
    )


async def consumers_registered(
    service: ServiceProcess, cluster: RabbitCluster, vhost: str, queue: str, ask: ClusterNode
) -> str:
    """Wait until the queue counts exactly the service's consumers. A dead node's consumer that
    RabbitMQ still counts after the restart (no channel owns it) is the same 3.10 fault as the
    orphaned deliveries: only then the leader is moved, and the count must come right after it.
    What the remedy did ("" when it was not needed)."""

    async def counted() -> bool:
        _, consumers = await queue_counts(ask.url(vhost), queue)
        return consumers == consumers_of(service)

    def ghost_only(checkouts: Checkouts) -> bool:
        return checkouts.listed_consumers == consumers_of(service) and checkouts.ghosts > 0

    async def broker(checkouts: Checkouts) -> str:
        return f"the broker: {checkouts}"

    remedied = await wait_or_move_leader(
        lambda: async_wait_until(
            counted, 30, "the service's consumers, and no other, on the queue"
        ),
        cluster,
        vhost,
        queue,
        ask,
        ghost_only,
        broker,
    )
    if remedied is None:
        return ""
    checkouts, moved_to = remedied
    return (
        f"RabbitMQ counted {checkouts.ghosts} dead consumer(s) until the queue's leader was "
        f"moved to node {moved_to.index}"
    )


async def test_the_quorum_leaders_node_killed_and_restarted_with_300_in_flight(
    start_service: Callable[..., ServiceProcess],
    service_env: dict[str, str],
    cluster: RabbitCluster,
    cluster_vhost: str,
    names: Names,
    fault_table: FaultTable,
) -> None:
    vhost, training = cluster_vhost, names.training
    await declare_quorum_queues(cluster.nodes[0].url(vhost), names)
    leader = cluster.leader(vhost, training)
    assert leader is not None, "the quorum queue has a leader"
    others = [node for node in cluster.nodes if node is not leader]
    service_nodes = [leader, *others]  # the leader's node first: the service connects there

    service = start_service(
        service_env,
        DEPLOYFLAG_AMQP_URL=",".join(node.url(vhost) for node in service_nodes),
        DEPLOYFLAG_QUEUE_TYPE="quorum",
        DEPLOYFLAG_WORKERS="2",
    )
    # The tally on the last node: it stays up (the service's next node is others[0]).
    async with Tally(others[-1].url(vhost), names, queue_arguments=QUORUM) as tally:
        ports = await asyncio.to_thread(connected_ports, cluster, others[-1], vhost)
        assert sorted(ports) == sorted([others[-1].port, leader.port]), (
            "the tally on the last node, the service on the leader's"
        )
        for i in range(REQUESTS):
            await tally.publish(WORKED, message_id=f"req-{i:03d}")
        await async_wait_until(lambda: len(tally.replies) >= 30, 90, "30 replies")

        await asyncio.to_thread(cluster.kill, leader)
        killed_at = time.monotonic()
        answered_at_kill = len(tally.replies)
        assert answered_at_kill < REQUESTS - 100, "too few requests left in flight at the kill"

        await async_wait_until(
            lambda: asyncio.to_thread(new_leader, cluster, vhost, training, others[-1], leader),
            60,
            "a new leader on a surviving node",
            every=0.5,
        )

        # Served from another node while the killed one is still down.
        async def stalled_down(checkouts: Checkouts) -> str:  # what the broker and service saw
            ports = await asyncio.to_thread(connected_ports, cluster, others[-1], vhost)
            return (
                f"{len(tally.replies) - answered_at_kill} came; the broker: {checkouts}; "
                f"client connections on ports {ports}; service ready: {service.is_ready()}"
            )

        remedies = [
            await wait_or_release_orphans(
                lambda: async_wait_until(
                    lambda: len(tally.replies) >= answered_at_kill + 50,
                    90,
                    "50 more replies while the node is down",
                ),
                cluster,
                vhost,
                training,
                others[-1],
                stalled_down,
            )
        ]
        failover_seconds = time.monotonic() - killed_at
        ports = await asyncio.to_thread(connected_ports, cluster, others[-1], vhost)
        ports.remove(others[-1].port)  # the tally's
        assert len(ports) == 1, "the service has one connection"
        moved_to = cluster.node_on_port(ports[0])
        assert moved_to is not leader, "the service is on a surviving node"

        await asyncio.to_thread(cluster.restart, leader)
        await async_wait_until(
            lambda: asyncio.to_thread(all_running, cluster, others[0]),
            60,
            "the restarted node back in the cluster",
            every=0.5,
        )

        async def stalled_settle(checkouts: Checkouts) -> str:
            return f"{len(tally.unanswered())} unanswered; the broker: {checkouts}"

        remedies.append(
            await wait_or_release_orphans(
                lambda: tally.settle(timeout=120),
                cluster,
                vhost,
                training,
                others[0],
                stalled_settle,
            )
        )
        remedies.append(await consumers_registered(service, cluster, vhost, training, others[0]))
        ready, _ = await queue_counts(others[0].url(vhost), training)
        remedy = "".join(f"; {text}" for text in remedies if text)
        row = await fault_table.record(
            tally,
            f"cluster of 3, quorum queues: the leader's node SIGKILLed with {REQUESTS} in flight, "
            f"restarted (the service moved to node {moved_to.index}; 50 more answered "
            f"{failover_seconds:.0f} s after the kill{remedy})",
            [service],
            sent=REQUESTS,
            replies=REQUESTS,
            rows=REQUESTS,
            parked=0,
        )
    print(row)  # shown with -rA; the table is written by make test-faults
    assert ready == 0, "the queue drained"
    assert service.is_ready()
