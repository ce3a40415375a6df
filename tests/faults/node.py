"""A private RabbitMQ node for the fault suite.

The fault scenarios stop the broker (``stop_app``) and change its global ``consumer_timeout``:
done to the machine's shared node, that would break every other test, benchmark or service using
it at the same time. So the suite starts a node of its own — same Debian package, its own node
name, ports and data directory under /tmp — and shuts it down at the end. Starting one takes
about 6 s here.

``DEPLOYFLAG_FAULTS_BROKER=shared`` runs the suite against the shared node instead (the one
`scripts/services.sh rabbitmq` starts), for machines where a second node cannot be started.

    python -m tests.faults.node   # start one by hand, print its URL, shut it down on Enter
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

from tests.support.toolkit import free_port, rabbit_node_env

RABBIT_BIN = Path("/usr/lib/rabbitmq/bin")
RABBIT_HOME = Path("/var/lib/rabbitmq")  # the rabbitmq user's home: its Erlang cookie
START_TIMEOUT = 60.0
CTL_TIMEOUT = 60.0


class BrokerError(RuntimeError):
    pass


class BrokerNode:
    """One RabbitMQ node: ``ctl`` runs rabbitmqctl against it; ``url`` is its default vhost."""

    host = "127.0.0.1"

    def __init__(
        self, *, private: bool = True, config: str = "", plugins: tuple[str, ...] = ()
    ) -> None:
        self.private = private
        self.config = config  # extra rabbitmq.conf lines (a private node only)
        self.plugins = plugins
        self.port = free_port() if private else 5672
        self.dist_port = free_port() if private else 0
        self.name = f"deployflag-faults-{uuid.uuid4().hex[:6]}@localhost" if private else ""
        self.base: Path | None = None
        self.started = False

    # --- commands ---------------------------------------------------------------------------

    def _as_rabbitmq(self, tool: str, *args: str) -> list[str]:
        """Run a RabbitMQ tool as the rabbitmq user (its cookie), whoever we are."""
        if not self.private:
            # The shared node: the Debian wrappers in /usr/sbin do the user switch themselves.
            found = shutil.which(tool)
            if found is None:
                raise BrokerError(f"{tool} not found: run `scripts/services.sh test-deps`")
            return [found, *args]
        command = [str(RABBIT_BIN / tool), *args]
        if os.geteuid() == 0:
            return ["runuser", "-u", "rabbitmq", "--", "env", f"HOME={RABBIT_HOME}", *command]
        if pwd.getpwuid(os.geteuid()).pw_name == "rabbitmq":
            return command
        raise BrokerError(
            "a private RabbitMQ node needs root or the rabbitmq user; "
            "set DEPLOYFLAG_FAULTS_BROKER=shared to use the shared node"
        )

    def ctl(self, *args: str, timeout: float = CTL_TIMEOUT) -> str:
        """``rabbitmqctl -q ARGS`` against this node; raises BrokerError on failure."""
        node = ["-n", self.name] if self.private else []
        done = subprocess.run(
            self._as_rabbitmq("rabbitmqctl", *node, "-q", *args),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if done.returncode != 0:
            raise BrokerError(f"rabbitmqctl {' '.join(args)}: {done.stderr.strip()}")
        return done.stdout

    def eval(self, expression: str) -> str:
        return self.ctl("eval", expression).strip()

    def log_text(self) -> str | None:
        """The node's own log (a private node only)."""
        if self.base is None:
            return None
        return "\n".join(
            path.read_text(errors="replace") for path in sorted((self.base / "log").glob("*.log"))
        )

    def url(self, vhost: str = "") -> str:
        return f"amqp://guest:guest@{self.host}:{self.port}/{vhost}"

    # --- life cycle -------------------------------------------------------------------------

    def start(self) -> BrokerNode:
        if not self.private:
            self.ctl("await_startup")
            return self
        if not (RABBIT_BIN / "rabbitmq-server").is_file():
            raise BrokerError("rabbitmq-server not installed: run `scripts/services.sh test-deps`")
        self.base = Path(tempfile.mkdtemp(prefix="deployflag-rabbit-", dir="/tmp"))
        (self.base / "enabled_plugins").write_text(f"[{','.join(self.plugins)}].\n")
        (self.base / "rabbitmq.conf").write_text(self.config + "\n")
        if os.geteuid() == 0:
            owner = pwd.getpwnam("rabbitmq")
            for path in (self.base, self.base / "enabled_plugins", self.base / "rabbitmq.conf"):
                os.chown(path, owner.pw_uid, owner.pw_gid)
        env = {
            **os.environ,
            **rabbit_node_env(self.name, self.host, self.port, self.dist_port, self.base),
        }
        subprocess.run(
            self._as_rabbitmq("rabbitmq-server", "-detached"),
            env=env,
            cwd=self.base,
            capture_output=True,
            timeout=CTL_TIMEOUT,
            check=True,
        )
        self.started = True
        self.await_startup()
        return self

    def await_startup(self, timeout: float = START_TIMEOUT) -> None:
        """Poll until the node runs its app (``await_startup`` fails before it registers)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.ctl("await_startup", timeout=timeout)
                return
            except (BrokerError, subprocess.TimeoutExpired) as exc:
                if time.monotonic() > deadline:
                    raise BrokerError(
                        f"node {self.name} not up after {timeout:.0f} s: {exc}"
                    ) from None
            time.sleep(0.5)  # poll interval

    def stop_app(self) -> None:
        self.ctl("stop_app")

    def start_app(self) -> None:
        self.ctl("start_app")
        self.await_startup()

    def shutdown(self) -> None:
        if not self.private:
            return
        try:
            if self.started:
                self.ctl("shutdown")
        finally:
            self.started = False
            if self.base is not None:
                shutil.rmtree(self.base, ignore_errors=True)


if __name__ == "__main__":
    node = BrokerNode().start()
    print(node.name, node.url())
    try:
        input("Enter to shut it down ")
    finally:
        node.shutdown()
