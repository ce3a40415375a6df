"""A throwaway certificate authority, a RabbitMQ node with a TLS listener and a PostgreSQL cluster
with ``ssl=on`` (pytest plugin: ``certs``, ``tls_broker``, ``tls_postgres``).

The server certificates name only ``127.0.0.1``: the same server reached as ``localhost`` presents
a certificate for the wrong host. A second CA, which signed nothing here, is the "unknown CA".
The PostgreSQL cluster accepts TCP connections over TLS only (``hostnossl … reject``) and wants a
client certificate from this CA, so a test that gets an answer has proved both.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme

from tests.faults.node import BrokerError, BrokerNode
from tests.support.postgres import PostgresCluster, find_bindir
from tests.support.toolkit import free_port

CLIENT_NAME = "deployflag-client"  # the client certificate's CN: the EXTERNAL user name


@dataclass(frozen=True)
class Certificates:
    directory: Path
    ca: Path  # the CA that signed the servers' and the client's certificates
    other_ca: Path  # a CA that signed nothing here
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


@pytest.fixture(scope="session")
def certs() -> Iterator[Certificates]:
    # Readable by the rabbitmq and postgres users (the servers load them as themselves).
    directory = Path(tempfile.mkdtemp(prefix="deployflag-tls-", dir="/tmp"))
    directory.chmod(0o755)
    ca = trustme.CA()
    other = trustme.CA()
    server = ca.issue_cert("127.0.0.1")
    client = ca.issue_cert(CLIENT_NAME, common_name=CLIENT_NAME)
    paths = Certificates(
        directory=directory,
        ca=directory / "ca.pem",
        other_ca=directory / "other-ca.pem",
        server_cert=directory / "server.pem",
        server_key=directory / "server.key",
        client_cert=directory / "client.pem",
        client_key=directory / "client.key",
    )
    ca.cert_pem.write_to_path(str(paths.ca))
    other.cert_pem.write_to_path(str(paths.other_ca))
    server.private_key_pem.write_to_path(str(paths.server_key))
    paths.server_cert.write_bytes(b"".join(blob.bytes() for blob in server.cert_chain_pems))
    client.private_key_pem.write_to_path(str(paths.client_key))
    paths.client_cert.write_bytes(b"".join(blob.bytes() for blob in client.cert_chain_pems))
    for path in directory.iterdir():
        path.chmod(0o644)
    try:
        yield paths
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@dataclass
class TLSBroker:
    node: BrokerNode
    tls_port: int
    vhost: str

    @property
    def plain_url(self) -> str:
        """The same vhost over plain TCP, for the test's own upstream."""
        return self.node.url(self.vhost)

    def tls_url(self, host: str = "127.0.0.1", credentials: str = "guest:guest@") -> str:
        return f"amqps://{credentials}{host}:{self.tls_port}/{self.vhost}"

    def connections(self) -> list[dict[str, str]]:
        """Every client connection: its name, whether it is TLS, its user and mechanism."""
        fields = ["client_properties", "ssl", "user", "auth_mechanism"]
        rows = []
        for line in self.node.ctl("list_connections", "--no-table-headers", *fields).splitlines():
            parts = line.split("\t")
            if len(parts) == len(fields):
                rows.append(dict(zip(fields, parts, strict=True)))
        return rows


@pytest.fixture(scope="session")
def tls_broker(certs: Certificates) -> Iterator[TLSBroker]:
    """A private node with a TLS listener next to its plain one (root or the rabbitmq user)."""
    port = free_port()
    config = f"""
listeners.ssl.1 = 127.0.0.1:{port}
ssl_options.cacertfile = {certs.ca}
ssl_options.certfile = {certs.server_cert}
ssl_options.keyfile = {certs.server_key}
ssl_options.verify = verify_peer
ssl_options.fail_if_no_peer_cert = false
ssl_cert_login_from = common_name
auth_mechanisms.1 = PLAIN
auth_mechanisms.2 = AMQPLAIN
auth_mechanisms.3 = EXTERNAL
"""
    node = BrokerNode(config=config, plugins=("rabbitmq_auth_mechanism_ssl",))
    try:
        node.start()
    except BrokerError as exc:
        node.shutdown()
        pytest.fail(f"could not start a RabbitMQ node with TLS: {exc}", pytrace=False)
    vhost = f"deployflag-tls-{uuid.uuid4().hex[:6]}"
    try:
        node.ctl("add_vhost", vhost)
        node.ctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
        # The EXTERNAL user: named by the client certificate, no password at all.
        node.ctl("add_user", CLIENT_NAME, uuid.uuid4().hex)
        node.ctl("clear_password", CLIENT_NAME)
        node.ctl("set_permissions", "-p", vhost, CLIENT_NAME, ".*", ".*", ".*")
        yield TLSBroker(node=node, tls_port=port, vhost=vhost)
    finally:
        node.shutdown()


class TLSPostgres(PostgresCluster):
    """A cluster that speaks TLS with the test CA's certificate and refuses clear TCP."""

    def __init__(self, bindir: Path, certs: Certificates) -> None:
        super().__init__(bindir)
        self.certs = certs

    def enable_tls(self) -> None:
        # PostgreSQL insists that its key belongs to it and nobody else can read it.
        key = self.base / "server.key"
        shutil.copyfile(self.certs.server_key, key)
        key.chmod(0o600)
        if self.as_root:
            owner = pwd.getpwnam("postgres")
            os.chown(key, owner.pw_uid, owner.pw_gid)
        self.extra_options = (
            f"-c ssl=on -c ssl_cert_file={self.certs.server_cert} -c ssl_key_file={key} "
            f"-c ssl_ca_file={self.certs.ca}"
        )
        hba = self.data / "pg_hba.conf"
        lines = [
            "local all all trust",
            "hostssl all all 127.0.0.1/32 scram-sha-256 clientcert=verify-ca",
            "hostnossl all all 0.0.0.0/0 reject",
        ]
        hba.write_text("\n".join(lines) + "\n")
        self.stop()
        self.start()

    def tls_connections(self) -> tuple[int, int]:
        """(TLS connections, all TCP connections) of the service (its application_name)."""
        out = self.psql(
            "COPY (SELECT count(*) FILTER (WHERE s.ssl), count(*) FROM pg_stat_ssl s "
            "JOIN pg_stat_activity a USING (pid) WHERE a.application_name = 'deployflag' "
            "AND a.client_addr IS NOT NULL) TO STDOUT"
        )
        ssl_count, total = out.split()
        return int(ssl_count), int(total)


@pytest.fixture(scope="session")
def tls_postgres(certs: Certificates) -> Iterator[TLSPostgres]:
    bindir = find_bindir()
    if bindir is None:
        pytest.fail("PostgreSQL server binaries not found: apt-get install -y postgresql")
    cluster = TLSPostgres(bindir, certs)
    try:
        cluster.setup()
        cluster.enable_tls()
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        cluster.close()
        pytest.fail(f"could not start PostgreSQL with ssl=on: {exc}", pytrace=False)
    try:
        yield cluster
    finally:
        cluster.close()
