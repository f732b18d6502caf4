"""amqps:// against a project-owned node with a TLS listener and a throwaway CA.

The server's certificate is verified against `AMQP_LISTENER_TLS_CA_FILE` and must name the
host connected to; an unknown CA or a hostname mismatch is refused with an error that says
which, and nothing ever falls back to plaintext. Every client is covered: the worker's
transport (aio-pika and pika), `notify()`, the asyncio publisher and the CLI.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pika
import pytest
from faults.node import SERVER, RabbitNode
from support.runner_process import EXECUTABLE, clean_env
from support.waiting import wait_until

from listener.apublisher import AsyncPublisher
from listener.errors import (
    AuthenticationFailed,
    BrokerUnreachable,
    ConfigurationError,
    PublishRefused,
    PublishUnreachable,
)
from listener.publisher import Publisher
from listener.runner.amqp_transport import Transport
from listener.settings import Settings

pytestmark = pytest.mark.slow

TESTS = Path(__file__).resolve().parent


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_ca(directory: Path, name: str) -> None:
    """`<name>-ca.pem` and its key: a self-signed CA for this run only."""
    openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        "-subj", f"/CN=amqp-listener test {name} CA",
        "-keyout", f"{name}-ca.key", "-out", f"{name}-ca.pem", cwd=directory,
    )  # fmt: skip


def make_certificate(directory: Path, name: str, ca: str, san: str) -> None:
    """`<name>.pem` and `<name>.key`, signed by CA `ca`, naming `san` only."""
    openssl(
        "req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
        "-keyout", f"{name}.key", "-out", f"{name}.csr", cwd=directory,
    )  # fmt: skip
    (directory / f"{name}.ext").write_text(f"subjectAltName={san}\n")
    openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}-ca.pem", "-CAkey", f"{ca}-ca.key",
        "-CAcreateserial", "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.pem",
        cwd=directory,
    )  # fmt: skip


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


#: The user a client certificate logs in as with EXTERNAL: its common name.
CLIENT = "amqp-listener-client"


class TlsNode(RabbitNode):
    """A node with a TLS listener next to its plaintext one; its certificate names
    127.0.0.1 only (so `localhost` is a hostname mismatch). It offers EXTERNAL login by a
    client certificate's common name: `client.pem` (user CLIENT exists) and `stranger.pem`
    (no such user), both signed by the test CA."""

    def __init__(self, base: Path, port: int) -> None:
        self.tls_port = free_port()
        super().__init__(base, port)

    def _write_files(self) -> None:
        super()._write_files()
        certs = self.base / "certs"
        certs.mkdir()
        make_ca(certs, "test")
        make_ca(certs, "other")
        make_certificate(certs, "server", "test", "IP:127.0.0.1")
        make_certificate(certs, CLIENT, "test", "DNS:client.invalid")
        make_certificate(certs, "stranger", "test", "DNS:stranger.invalid")
        (self.base / "enabled_plugins").write_text("[rabbitmq_auth_mechanism_ssl].\n")
        with (self.base / "rabbitmq.conf").open("a") as conf:
            conf.write(
                f"listeners.ssl.default = 127.0.0.1:{self.tls_port}\n"
                f"ssl_options.cacertfile = {certs / 'test-ca.pem'}\n"
                f"ssl_options.certfile = {certs / 'server.pem'}\n"
                f"ssl_options.keyfile = {certs / 'server.key'}\n"
                # Asked for, not required: the clients without one log in with a password.
                "ssl_options.verify = verify_peer\n"
                "ssl_options.fail_if_no_peer_cert = false\n"
                "auth_mechanisms.1 = PLAIN\n"
                "auth_mechanisms.2 = AMQPLAIN\n"
                "auth_mechanisms.3 = EXTERNAL\n"
                "ssl_cert_login_from = common_name\n"
            )

    def start(self, timeout: float = 60.0) -> float:
        took = super().start(timeout)
        self.ctl("add_user", CLIENT, secrets.token_hex(16))
        self.ctl("set_permissions", "-p", "/", CLIENT, ".*", ".*", ".*")
        return took

    def tls_url(self, host: str = "127.0.0.1") -> str:
        return f"amqps://guest:guest@{host}:{self.tls_port}/%2F"

    def external_url(self) -> str:
        """No user name nor password: the client certificate is the login."""
        return f"amqps://127.0.0.1:{self.tls_port}/%2F?auth_mechanism=external"

    def certificate(self, name: str) -> dict[str, Path]:
        """The settings that present client certificate `name`."""
        certs = self.base / "certs"
        return {"tls_cert_file": certs / f"{name}.pem", "tls_key_file": certs / f"{name}.key"}

    def users_connected(self) -> list[str]:
        """`user auth_mechanism` of each client connection open now."""
        return self.ctl("list_connections", "user", "auth_mechanism", "--no-table-headers").split(
            "\n"
        )

    @property
    def ca_file(self) -> Path:
        return self.base / "certs" / "test-ca.pem"

    @property
    def other_ca_file(self) -> Path:
        return self.base / "certs" / "other-ca.pem"


@pytest.fixture(scope="module")
def node() -> Iterator[TlsNode]:
    if not RabbitNode.available():
        message = f"no RabbitMQ server binaries at {SERVER}: install the rabbitmq-server package"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    created = RabbitNode.create()
    created.destroy()  # only its free port was wanted
    tls = TlsNode(created.base, created.port)
    try:
        tls.start()
        yield tls
    finally:
        tls.destroy()


@pytest.fixture
def queue(node: TlsNode, unique: str) -> Iterator[str]:
    """Queue `<unique>`, bound to exchange `<unique>` on key `key`, over the plaintext port."""
    connection = pika.BlockingConnection(pika.URLParameters(node.url))
    channel = connection.channel()
    channel.exchange_declare(unique, "topic", durable=True)
    channel.queue_declare(unique, durable=True)
    channel.queue_bind(unique, unique, "key")
    yield unique
    channel.queue_delete(unique)
    channel.exchange_delete(unique)
    connection.close()


def depth(node: TlsNode, queue: str) -> int:
    connection = pika.BlockingConnection(pika.URLParameters(node.url))
    try:
        return int(connection.channel().queue_declare(queue, passive=True).method.message_count)
    finally:
        connection.close()


def cli(node: TlsNode, ca_file: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """`amqp-listener ARGS` with AMQP_URL the node's TLS URL, trusting `ca_file`."""
    environment = clean_env(TESTS)
    environment.update({"AMQP_URL": node.tls_url(), "AMQP_LISTENER_TLS_CA_FILE": str(ca_file)})
    environment.update(env)
    return subprocess.run(
        [EXECUTABLE, *args], env=environment, capture_output=True, text=True, timeout=60
    )


def tls_settings(node: TlsNode, url: str | None = None, **options: object) -> Settings:
    """Settings for `url` (the node's TLS one), trusting the test CA unless told otherwise."""
    return Settings(
        **{"url": url or node.tls_url(), "tls_ca_file": node.ca_file, "connect_timeout": 5}
        | options
    )


# -- refusals first ------------------------------------------------------------------------


def test_a_certificate_from_an_unknown_ca_is_refused_and_the_error_says_so(node):
    settings = tls_settings(node, tls_ca_file=node.other_ca_file)
    with pytest.raises(PublishUnreachable) as caught:
        Publisher(settings).publish("nowhere.key", {"n": 1})
    text = str(caught.value)
    assert "unknown CA" in text
    assert "AMQP_LISTENER_TLS_CA_FILE" in text
    assert "guest:guest" not in text


def test_a_host_name_the_certificate_does_not_list_is_refused_naming_the_host(node):
    settings = tls_settings(node, url=node.tls_url("localhost"))
    with pytest.raises(BrokerUnreachable) as caught:
        asyncio.run(Transport.connect(settings, name="test tls"))
    text = str(caught.value)
    assert "hostname mismatch" in text
    assert "'localhost'" in text


def test_amqps_to_a_plaintext_port_fails_rather_than_falling_back(node):
    settings = tls_settings(node, url=f"amqps://guest:guest@127.0.0.1:{node.port}/%2F")
    with pytest.raises(PublishUnreachable, match="TLS"):
        Publisher(settings).publish("nowhere.key", {"n": 1})

    async def publish() -> None:
        await AsyncPublisher(settings).publish("nowhere.key", {"n": 1})

    with pytest.raises(PublishUnreachable, match="TLS"):
        asyncio.run(publish())


def test_an_unreadable_ca_file_is_a_configuration_error_naming_the_setting(node, tmp_path):
    settings = tls_settings(node, tls_ca_file=tmp_path / "missing.pem")
    with pytest.raises(ConfigurationError, match="AMQP_LISTENER_TLS_CA_FILE"):
        Publisher(settings).publish("nowhere.key", {"n": 1})


def test_the_cli_refuses_an_unknown_ca_with_one_line_and_no_traceback(node, queue):
    done = cli(node, node.other_ca_file, "publish", f"{queue}.key", "{}")
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "unknown CA" in lines[0]
    assert depth(node, queue) == 0


def test_the_cli_refuses_a_hostname_mismatch_with_one_line_naming_the_host(node, queue):
    done = cli(
        node, node.ca_file, "publish", f"{queue}.key", "{}", AMQP_URL=node.tls_url("localhost")
    )
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "hostname mismatch" in lines[0]
    assert "'localhost'" in lines[0]
    assert "guest:guest" not in lines[0]
    assert depth(node, queue) == 0


def test_the_runner_refuses_an_unknown_ca_at_start_up_with_one_line(node, unique, tmp_path):
    app = {"APP_EXCHANGE": unique, "APP_QUEUE": unique, "APP_MARKER_DIR": str(tmp_path)}
    done = cli(node, node.other_ca_file, "run", "apps.fleet", "--fail-fast", **app)
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "unknown CA" in lines[0]
    assert "Traceback" not in done.stderr


def test_external_login_without_a_client_certificate_is_a_configuration_error(node):
    settings = tls_settings(node, url=node.external_url())
    with pytest.raises(ConfigurationError, match="AMQP_LISTENER_TLS_CERT_FILE"):
        Publisher(settings).publish("nowhere.key", {"n": 1})


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("amqp://127.0.0.1/%2F?auth_mechanism=external", "amqps://"),
        ("amqps://u:s3cr3t-pw@127.0.0.1/%2F?auth_mechanism=kerberos", "plain or external"),
    ],
)
def test_an_auth_mechanism_that_cannot_work_is_refused_by_the_settings(url, why):
    with pytest.raises(ConfigurationError, match=why) as caught:
        Settings().with_url(url)
    assert "s3cr3t-pw" not in str(caught.value)


def test_an_external_login_the_broker_refuses_says_it_was_the_certificate(node):
    settings = tls_settings(node, url=node.external_url(), **node.certificate("stranger"))
    with pytest.raises(PublishRefused, match="EXTERNAL") as caught:
        Publisher(settings).publish("nowhere.key", {"n": 1})
    assert "password" not in str(caught.value)
    with pytest.raises(AuthenticationFailed, match="EXTERNAL"):
        asyncio.run(Transport.connect(settings, name="test external"))


# -- success paths ---------------------------------------------------------------------------


def test_a_client_certificate_logs_in_with_external_on_both_clients(node, queue):
    settings = tls_settings(node, url=node.external_url(), **node.certificate(CLIENT))
    publisher = Publisher(settings)
    publisher.publish(f"{queue}.key", {"n": 1})
    assert f"{CLIENT}\tEXTERNAL" in node.users_connected()
    publisher.close()
    # The broker lists a closed connection a moment longer: count from none.
    wait_until(
        lambda: f"{CLIENT}\tEXTERNAL" not in node.users_connected(), 10, "the first to close"
    )

    async def publish_and_connect() -> list[str]:
        async_publisher = AsyncPublisher(settings)
        await async_publisher.publish(f"{queue}.key", {"n": 2})
        transport = await Transport.connect(settings, name="test external")
        try:
            return node.users_connected()
        finally:
            await transport.close()
            await async_publisher.aclose()

    # The async publisher's connection, and the worker's two (aio-pika, pika).
    assert asyncio.run(publish_and_connect()).count(f"{CLIENT}\tEXTERNAL") == 3
    assert depth(node, queue) == 2


def test_notify_and_async_publishing_work_over_verified_tls(node, queue):
    settings = tls_settings(node)
    publisher = Publisher(settings)
    publisher.publish(f"{queue}.key", {"n": 1})
    publisher.close()

    async def publish() -> None:
        async_publisher = AsyncPublisher(settings)
        await async_publisher.publish(f"{queue}.key", {"n": 2})
        await async_publisher.publish_bodies(queue, "key", [b"{}"] * 3)
        await async_publisher.aclose()

    asyncio.run(publish())
    assert depth(node, queue) == 5


def test_a_worker_transport_consumes_over_verified_tls(node, queue):
    async def receive_one() -> bytes:
        transport = await Transport.connect(tls_settings(node), name="test tls")
        try:
            assert transport.consuming.params.ssl_options is not None
            received: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
            await transport.consume(
                queue, 1, lambda inbound: received.done() or received.set_result(inbound.body)
            )
            publisher = AsyncPublisher(tls_settings(node))
            await publisher.publish(f"{queue}.key", {"over": "tls"})
            await publisher.aclose()
            return await asyncio.wait_for(received, 10)
        finally:
            await transport.close()

    assert asyncio.run(receive_one()) == b'{"over":"tls"}'


def test_the_cli_publishes_over_tls_with_the_ca_from_the_environment(node, queue):
    done = cli(node, node.ca_file, "publish", f"{queue}.key", '{"n": 1}')
    assert done.returncode == 0, done.stderr
    assert depth(node, queue) == 1
