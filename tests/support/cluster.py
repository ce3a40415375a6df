"""A throwaway RabbitMQ cluster of three nodes on 127.0.0.1, from Debian's ``rabbitmq-server``.

Each node has its own node name, AMQP port, distribution port and data directory under one temporary
directory; the cluster has an Erlang cookie of its own (a ``HOME`` of its own holds it), and its
nodes and command-line tools read an environment file of their own, so nothing here depends on,
or touches, the machine's broker (``rabbit@localhost`` on 5672) beyond sharing epmd. The nodes boot
in parallel, then the others join the first. :meth:`RabbitCluster.shutdown` stops every node and
kills what did not stop: no node outlives the cluster object's ``with`` block, and a watchdog
process kills the nodes if the test process dies without a teardown.

As root the nodes run as the ``rabbitmq`` user the package creates; otherwise as the caller.

    python -m tests.support.cluster   # start one by hand, print its URLs, shut it down on Enter
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from tests.support.toolkit import free_port, rabbit_node_env

RABBIT_BIN = Path("/usr/lib/rabbitmq/bin")
START_TIMEOUT = 90.0  # seconds for a node to boot (the machine may be busy)
CTL_TIMEOUT = 60.0
HOST = "127.0.0.1"
T = TypeVar("T")


class ClusterError(RuntimeError):
    pass


@dataclass
class ClusterNode:
    index: int  # 1-based
    name: str  # Erlang node name, name@localhost
    port: int  # AMQP
    dist_port: int  # Erlang distribution
    base: Path  # its data, logs and configuration
    pid: int | None = None  # the Erlang VM's OS process, while it runs

    def url(self, vhost: str = "") -> str:
        return f"amqp://guest:guest@{HOST}:{self.port}/{vhost}"


@dataclass(frozen=True)
class Checkouts:
    """A queue's deliveries out to consumers: as the queue counts them, and as channels do."""

    queue_ready: int
    queue_unacked: int
    queue_consumers: int
    channels_unacked: int  # summed over the vhost's channels on every node
    listed_consumers: int  # the consumers a channel owns

    @property
    def orphaned(self) -> bool:
        """RabbitMQ 3.10's quorum-queue fault after its leader's node dies (rabbitmq-server
        #15473): the queue counts deliveries out that no channel holds, and never redelivers them
        by itself. It has shown with the dead consumer still counted (one consumer more than the
        channels own) and without it."""
        return self.queue_unacked > 0 and self.channels_unacked == 0

    @property
    def ghosts(self) -> int:
        """Consumers the queue counts that no channel owns (a consumer of a dead node)."""
        return max(0, self.queue_consumers - self.listed_consumers)


def _port_block(size: int) -> int:
    """The first of ``size`` consecutive loopback ports nothing listens on right now."""
    for _ in range(200):
        first = 20000 + secrets.randbelow(10000)
        socks: list[socket.socket] = []
        try:
            for port in range(first, first + size):
                sock = socket.socket()
                socks.append(sock)
                sock.bind((HOST, port))
            return first
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
    raise ClusterError(f"no block of {size} free ports found")


# Runs beside the test process: if that dies without tearing the cluster down (SIGKILL, a CI job
# cancelled), this kills the nodes (by the pid files they write) and removes their data.
_WATCHDOG = """
import os, shutil, signal, sys, time
parent, root = int(sys.argv[1]), sys.argv[2]
while os.path.isdir(root):
    try:
        os.kill(parent, 0)
    except ProcessLookupError:
        for entry in os.listdir(root):
            try:
                with open(os.path.join(root, entry, "rabbitmq.pid")) as pid_file:
                    os.kill(int(pid_file.read().strip()), signal.SIGKILL)
            except (OSError, ValueError):
                pass
        shutil.rmtree(root, ignore_errors=True)
        break
    time.sleep(1)
"""


def _parallel(function: Callable[[ClusterNode], T], nodes: Sequence[ClusterNode]) -> list[T]:
    with ThreadPoolExecutor(max_workers=len(nodes)) as pool:
        return list(pool.map(function, nodes))


class RabbitCluster:
    """``with RabbitCluster() as cluster:`` — three clustered nodes; ``cluster.ctl(node, …)`` runs
    rabbitmqctl against one, ``cluster.urls(vhost)`` are the AMQP URLs of all."""

    def __init__(self, size: int = 3) -> None:
        if size < 1:
            raise ValueError("a cluster needs a node")
        self.size = size
        self.user = self._user()
        self.root = Path(tempfile.mkdtemp(prefix="deployflag-cluster-", dir="/tmp"))
        self.home = self.root / "home"  # the cookie, for the nodes and the command-line tools
        self.env_file = self.root / "rabbitmq-env.conf"
        self.ctl_ports = _port_block(11)  # the command-line tools' own distribution ports
        self._watchdog: subprocess.Popen[bytes] | None = None
        tag = uuid.uuid4().hex[:6]
        self.nodes = [
            ClusterNode(
                index=i,
                name=f"deployflag-c{i}-{tag}@localhost",
                port=free_port(),
                dist_port=free_port(),
                base=self.root / f"node{i}",
            )
            for i in range(1, size + 1)
        ]

    # --- context ------------------------------------------------------------------------------

    def __enter__(self) -> RabbitCluster:
        try:
            return self.start()
        except BaseException:
            self.shutdown()
            raise

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # --- commands -----------------------------------------------------------------------------

    @staticmethod
    def _user() -> pwd.struct_passwd | None:
        """The account the nodes run as: ``rabbitmq`` when we are root, else ourselves (None)."""
        if os.geteuid() != 0:
            return None
        try:
            return pwd.getpwnam("rabbitmq")
        except KeyError:
            raise ClusterError("no rabbitmq user: is rabbitmq-server installed?") from None

    def _env(self, node: ClusterNode | None = None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
        env.update(
            {
                "HOME": str(self.home),
                "RABBITMQ_CONF_ENV_FILE": str(self.env_file),
                "ERL_EPMD_ADDRESS": HOST,
                "RABBITMQ_CTL_DIST_PORT_MIN": str(self.ctl_ports),
                "RABBITMQ_CTL_DIST_PORT_MAX": str(self.ctl_ports + 10),
            }
        )
        if node is not None:
            env.update(rabbit_node_env(node.name, HOST, node.port, node.dist_port, node.base))
        return env

    def _command(self, tool: str, *args: str) -> list[str]:
        command = [str(RABBIT_BIN / tool), *args]
        if self.user is None:
            return command
        # runuser sets HOME to the user's own (and its cookie): put ours back.
        return ["runuser", "-u", self.user.pw_name, "--", "env", f"HOME={self.home}", *command]

    def ctl(self, node: ClusterNode, *args: str, timeout: float = CTL_TIMEOUT) -> str:
        """``rabbitmqctl -n NODE -q ARGS``; its output, or ClusterError."""
        return self._tool("rabbitmqctl", node, *args, timeout=timeout)

    def _tool(self, tool: str, node: ClusterNode, *args: str, timeout: float) -> str:
        done = subprocess.run(
            self._command(tool, "-n", node.name, "-q", *args),
            env=self._env(),
            cwd=self.root,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if done.returncode != 0:
            raise ClusterError(f"{tool} -n {node.name} {' '.join(args)}: {done.stderr.strip()}")
        return done.stdout

    # --- life cycle ---------------------------------------------------------------------------

    def start(self) -> RabbitCluster:
        if not (RABBIT_BIN / "rabbitmq-server").is_file():
            raise ClusterError("rabbitmq-server not installed: run `scripts/services.sh test-deps`")
        self._prepare()
        self._watchdog = subprocess.Popen(  # ends by itself once the cluster's directory is gone
            [sys.executable, "-c", _WATCHDOG, str(os.getpid()), str(self.root)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        _parallel(self._boot, self.nodes)
        first, *others = self.nodes

        def join(node: ClusterNode) -> None:
            self.ctl(node, "stop_app")
            self.ctl(node, "join_cluster", first.name)
            self.ctl(node, "start_app")

        for node in others:  # one at a time: two joining at once can fail Mnesia's start
            join(node)
        _parallel(self.await_startup, self.nodes)
        running = self.running_nodes(first)
        if sorted(running) != sorted(node.name for node in self.nodes):
            raise ClusterError(f"the cluster formed with {running} only")
        return self

    def _prepare(self) -> None:
        self.home.mkdir()
        cookie = self.home / ".erlang.cookie"
        cookie.write_text(secrets.token_hex(20))
        self.env_file.write_text("# this cluster's own: the machine's broker settings stay out\n")
        paths = [self.root, self.home, cookie, self.env_file]
        for node in self.nodes:
            node.base.mkdir()
            (node.base / "enabled_plugins").write_text("[].\n")
            (node.base / "rabbitmq.conf").write_text("\n")
            paths += [node.base, node.base / "enabled_plugins", node.base / "rabbitmq.conf"]
        cookie.chmod(0o400)  # Erlang refuses a cookie others can read
        if self.user is not None:
            for path in paths:
                os.chown(path, self.user.pw_uid, self.user.pw_gid)

    def _boot(self, node: ClusterNode) -> None:
        """Start one node's VM (``-detached`` returns at once) and wait until it runs."""
        done = subprocess.run(
            self._command("rabbitmq-server", "-detached"),
            env=self._env(node),
            cwd=node.base,
            capture_output=True,
            text=True,
            timeout=CTL_TIMEOUT,
            check=False,
        )
        if done.returncode != 0:
            raise ClusterError(f"{node.name} did not start: {done.stderr.strip()}")
        self.await_startup(node)
        node.pid = int(self.ctl(node, "eval", "list_to_integer(os:getpid()).").strip())

    def await_startup(self, node: ClusterNode, timeout: float = START_TIMEOUT) -> None:
        """Poll until the node runs its app (``await_startup`` fails before it registers)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.ctl(node, "await_startup", timeout=timeout)
                return
            except (ClusterError, subprocess.TimeoutExpired) as exc:
                if time.monotonic() > deadline:
                    raise ClusterError(
                        f"node {node.name} not up after {timeout:.0f} s: {exc}\n{self.log(node)}"
                    ) from None
            time.sleep(0.5)  # poll interval while the node registers

    def running_nodes(self, node: ClusterNode) -> list[str]:
        """The cluster members running, as ``node`` sees them."""
        text = self.ctl(node, "eval", "rabbit_nodes:all_running().")
        return re.findall(r"[\w.-]+@[\w.-]+", text)

    def kill(self, node: ClusterNode) -> None:
        """SIGKILL to the node's VM: no goodbye to its peers or its clients."""
        if node.pid is None:
            raise ClusterError(f"{node.name} is not running")
        os.kill(node.pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while _alive(node.pid):  # its sockets close when the process is gone
            if time.monotonic() > deadline:
                raise ClusterError(f"{node.name} (pid {node.pid}) survived SIGKILL")
            time.sleep(0.05)
        node.pid = None

    def restart(self, node: ClusterNode) -> None:
        """Boot a stopped node again, with its data: it rejoins the cluster."""
        self._boot(node)

    def shutdown(self) -> None:
        """Stop every node (``rabbitmqctl shutdown``), kill any that did not stop, remove the
        data. Safe to call more than once and after a failed start."""

        def stop(node: ClusterNode) -> None:
            pid = node.pid or _pid_from_file(node)
            if pid is None or not _alive(pid):
                return
            with contextlib.suppress(ClusterError, subprocess.TimeoutExpired):
                self.ctl(node, "shutdown", timeout=30)
            if _alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            node.pid = None

        try:
            _parallel(stop, self.nodes)
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
            if self._watchdog is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self._watchdog.wait(timeout=5)  # it polls once a second
                self._watchdog = None

    # --- facts --------------------------------------------------------------------------------

    def urls(self, vhost: str = "") -> list[str]:
        return [node.url(vhost) for node in self.nodes]

    def node_named(self, name: str) -> ClusterNode:
        for node in self.nodes:
            if node.name == name:
                return node
        raise ClusterError(f"{name} is not a node of this cluster")

    def node_on_port(self, port: int) -> ClusterNode:
        for node in self.nodes:
            if node.port == port:
                return node
        raise ClusterError(f"no node listens on {port}")

    def leader(self, vhost: str, queue: str, ask: ClusterNode | None = None) -> ClusterNode | None:
        """The node holding a quorum queue's leader (None while there is none)."""
        ask = ask or next(node for node in self.nodes if node.pid is not None)
        for line in self.ctl(ask, "list_queues", "-p", vhost, "name", "leader").splitlines():
            fields = line.split("\t")
            if len(fields) == 2 and fields[0] == queue and "@" in fields[1]:
                return self.node_named(fields[1].strip())
        return None

    def checkouts(self, vhost: str, queue: str, ask: ClusterNode) -> Checkouts:
        """A queue's deliveries out to consumers as the queue counts them and as the channels do
        (``list_queues``, ``list_channels`` and ``list_consumers`` are cluster-wide)."""
        ready = unacked = consumers = 0
        for line in self.ctl(
            ask,
            "list_queues",
            "-p",
            vhost,
            "name",
            "messages_ready",
            "messages_unacknowledged",
            "consumers",
        ).splitlines():
            fields = line.split("\t")
            if len(fields) == 4 and fields[0] == queue:
                ready, unacked, consumers = (int(field) for field in fields[1:])
        channels = 0
        for line in self.ctl(ask, "list_channels", "vhost", "messages_unacknowledged").splitlines():
            fields = line.split("\t")
            if len(fields) == 2 and fields[0] == vhost and fields[1].isdigit():
                channels += int(fields[1])
        listed = sum(
            1
            for line in self.ctl(ask, "list_consumers", "-p", vhost, "queue_name").splitlines()
            if line.strip() == queue
        )
        return Checkouts(ready, unacked, consumers, channels, listed)

    def move_leader(self, vhost: str, queue: str, ask: ClusterNode) -> ClusterNode:
        """Move a quorum queue's leader to another running node (Ra's leadership transfer, asked
        of the leader), so that a new leader takes stock of every consumer afresh; that node."""
        leader = self.leader(vhost, queue, ask)
        if leader is None:
            raise ClusterError(f"{queue}: no leader to move")
        to = next((n for n in self.nodes if n is not leader and n.pid is not None), None)
        if to is None:  # a bare StopIteration would not cross asyncio.to_thread
            raise ClusterError(f"{queue}: no other running node to take the leadership")
        erlang = (
            "{ok, Q} = rabbit_amqqueue:lookup(rabbit_misc:r("
            f'<<"{vhost}">>, queue, <<"{queue}">>)), '
            "{Name, _} = amqqueue:get_pid(Q), "
            f"ra:transfer_leadership({{Name, node()}}, {{Name, '{to.name}'}})."
        )
        answer = self.ctl(leader, "eval", erlang).strip()
        if answer not in ("ok", "already_leader"):
            raise ClusterError(f"{queue}: leadership transfer to {to.name}: {answer}")
        return to

    def log(self, node: ClusterNode) -> str:
        logs = sorted((node.base / "log").glob("*.log"))
        return "\n".join(path.read_text(errors="replace")[-4000:] for path in logs)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie still answers kill(0): look at its state.
    with contextlib.suppress(OSError):
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    return True


def _pid_from_file(node: ClusterNode) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        return int((node.base / "rabbitmq.pid").read_text().strip())
    return None


@contextlib.contextmanager
def cluster(size: int = 3) -> Iterator[RabbitCluster]:
    with RabbitCluster(size) as running:
        yield running


if __name__ == "__main__":
    started = time.monotonic()
    with cluster() as c:
        print(f"up in {time.monotonic() - started:.1f} s")
        for n in c.nodes:
            print(n.name, n.url(), "pid", n.pid)
        input("Enter to shut it down ")
