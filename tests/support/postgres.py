"""A throwaway PostgreSQL cluster for the test session (pytest plugin: the ``postgres`` fixture).

``initdb`` into a temporary directory, ``pg_ctl start`` on a free loopback port with its socket in
that directory, so the machine's own cluster (if any) is never touched. As root, the directory is
owned by ``postgres`` and every server command runs through ``runuser -u postgres --`` (PostgreSQL
refuses to run as root); as anyone else the commands run directly.

Local (socket) connections trust the superuser ``postgres``, used only for administration here;
TCP connections need a password (scram-sha-256), so tests can also try a wrong one.

Missing binaries fail the tests that need them, loudly: CI installs them (``apt-get install -y
postgresql``).
"""

from __future__ import annotations

import os
import pwd
import re
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.engine import URL

from tests.support.toolkit import free_port

PG_ROOT = Path("/usr/lib/postgresql")
START_TIMEOUT = 60.0  # seconds for the server to accept connections
COMMAND_TIMEOUT = 120.0
# Durability is pointless for a throwaway cluster; speed is not.
SERVER_OPTIONS = (
    "-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
    "-c max_connections=200 -c log_min_messages=warning"
)
_IDENTIFIER = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


def find_bindir() -> Path | None:
    """The newest ``/usr/lib/postgresql/<version>/bin`` with a server in it, else ``$PATH``'s."""

    def version(path: Path) -> tuple[int, ...]:
        return tuple(int(p) for p in re.findall(r"\d+", path.parent.name)) or (0,)

    for bindir in sorted(PG_ROOT.glob("*/bin"), key=version, reverse=True):
        if all((bindir / tool).is_file() for tool in ("initdb", "pg_ctl", "postgres")):
            return bindir
    found = shutil.which("pg_ctl")
    if found and (Path(found).parent / "initdb").is_file():
        return Path(found).parent
    return None


class PostgresCluster:
    """One server: ``url`` for the test database, ``stop()``/``start()`` for fault tests."""

    host = "127.0.0.1"
    superuser = "postgres"
    user = "deployflag"
    database = "deployflag"

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.as_root = os.geteuid() == 0
        # As root the directory must be reachable by the postgres user: not under a 0700 TMPDIR.
        self.base = Path(
            tempfile.mkdtemp(prefix="deployflag-pg-", dir="/tmp" if self.as_root else None)
        )
        self.data = self.base / "data"
        self.sockdir = self.base / "sock"
        self.logfile = self.base / "postgres.log"
        self.port = free_port()
        self.password = secrets.token_urlsafe(18)
        self.running = False

    # --- plumbing ---------------------------------------------------------------------------

    def _command(self, tool: str, *args: str) -> list[str]:
        command = [str(self.bindir / tool), *args]
        return ["runuser", "-u", "postgres", "--", *command] if self.as_root else command

    def _run(self, tool: str, *args: str) -> subprocess.CompletedProcess[str]:
        completed = subprocess.run(
            self._command(tool, *args),
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT,
            check=False,
            cwd=self.base,
        )
        if completed.returncode != 0:
            raise RuntimeError(
                f"{tool} {' '.join(args)} failed ({completed.returncode}):\n"
                f"{completed.stdout}{completed.stderr}{self.log_tail()}"
            )
        return completed

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.logfile.read_text(errors="replace")
        except OSError:
            return ""
        return "\n--- server log ---\n" + "\n".join(text.splitlines()[-lines:])

    def psql(self, sql: str, database: str = "postgres") -> str:
        """Run SQL as the superuser over the private socket."""
        return self._run(
            "psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", str(self.sockdir), "-p",
            str(self.port), "-U", self.superuser, "-d", database, "-c", sql,
        ).stdout  # fmt: skip

    # --- life cycle -------------------------------------------------------------------------

    def setup(self) -> None:
        self.sockdir.mkdir()
        if self.as_root:
            owner = pwd.getpwnam("postgres")
            for path in (self.base, self.sockdir):
                os.chown(path, owner.pw_uid, owner.pw_gid)
        self._run(
            "initdb", "-D", str(self.data), "-U", self.superuser, "-E", "UTF8", "--no-locale",
            "--auth-local=trust", "--auth-host=scram-sha-256", "--no-sync",
        )  # fmt: skip
        self.start()
        self.psql(f"CREATE ROLE {self.user} LOGIN CREATEDB PASSWORD '{self.password}'")
        self.psql(f"CREATE DATABASE {self.database} OWNER {self.user}")

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Start the server (again) on the same port and wait until it accepts connections."""
        options = (
            f"-c listen_addresses={self.host} -p {self.port} -k {self.sockdir} {SERVER_OPTIONS}"
        )
        # -w: pg_ctl itself notices a server that dies while starting, and says so.
        self._run(
            "pg_ctl", "-D", str(self.data), "-l", str(self.logfile), "-o", options,
            "-w", "-t", str(int(timeout)), "start",
        )  # fmt: skip
        self.running = True
        self.wait_ready(timeout)

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        """Poll ``pg_isready`` on the TCP port until it answers, or fail after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            ready = subprocess.run(
                self._command("pg_isready", "-q", "-h", self.host, "-p", str(self.port), "-t", "1"),
                capture_output=True,
                check=False,
                timeout=COMMAND_TIMEOUT,
            )
            if ready.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"PostgreSQL not ready after {timeout:.0f}s{self.log_tail()}")
            time.sleep(0.1)  # poll interval

    def stop(self) -> None:
        """Stop the server now (clients are disconnected); waits until it is down."""
        if self.running:
            self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "-t", "60", "stop")
            self.running = False

    def close(self) -> None:
        try:
            self.stop()
        finally:
            shutil.rmtree(self.base, ignore_errors=True)

    # --- URLs and databases -----------------------------------------------------------------

    def url_for(
        self, database: str, *, password: str | None = None, port: int | None = None
    ) -> str:
        """A ``postgresql+asyncpg://`` URL for the test role (optionally with a wrong password)."""
        return URL.create(
            "postgresql+asyncpg",
            username=self.user,
            password=self.password if password is None else password,
            host=self.host,
            port=self.port if port is None else port,
            database=database,
        ).render_as_string(hide_password=False)

    @property
    def url(self) -> str:
        return self.url_for(self.database)

    def fresh_database(self, name: str) -> str:
        """An empty database owned by the test role (dropped first if it exists); its URL."""
        if not _IDENTIFIER.match(name):
            raise ValueError(f"not a plain lower-case identifier: {name!r}")
        self.psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        self.psql(f"CREATE DATABASE {name} OWNER {self.user}")
        return self.url_for(name)


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresCluster]:
    """The session's PostgreSQL cluster; fails (never skips) when the server is not installed."""
    bindir = find_bindir()
    if bindir is None:
        pytest.fail(
            f"PostgreSQL server binaries not found (looked in {PG_ROOT}/*/bin and $PATH): "
            "install them with `apt-get install -y postgresql`",
            pytrace=False,
        )
    cluster = PostgresCluster(bindir)
    try:
        cluster.setup()
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        cluster.close()
        pytest.fail(f"could not start a throwaway PostgreSQL from {bindir}: {exc}", pytrace=False)
    try:
        yield cluster
    finally:
        cluster.close()
