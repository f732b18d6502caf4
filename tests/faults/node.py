"""A RabbitMQ node owned by the fault suite: its own ports, data, logs and Erlang cookie.

The shared broker (127.0.0.1:5672) is never touched: the destructive faults (stop_app,
kill -9, forced closes, memory alarms) all happen to this node. It runs the Debian package's
server directly (`/usr/lib/rabbitmq/bin/rabbitmq-server`; the `/usr/sbin` wrappers switch
to the rabbitmq user and reset the environment), configured wholly by environment variables:

    node = RabbitNode.create()      # picks free ports, writes config under a temp dir
    node.start()                    # -detached, then waits until it serves AMQP
    node.ctl("close_all_connections", "test")
    node.destroy()                  # stops the node, kills it if it will not stop, rm -rf
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import string
import subprocess
import tempfile
import time
from pathlib import Path

import pika
import pika.exceptions

__all__ = ["CTL", "SERVER", "NodeError", "RabbitNode", "pid_alive"]

BIN = Path(os.environ.get("RABBITMQ_FAULT_BIN", "/usr/lib/rabbitmq/bin"))
SERVER = BIN / "rabbitmq-server"
CTL = BIN / "rabbitmqctl"
#: AMQP ports tried in turn; the distribution port is the AMQP port + 20000.
PORTS = range(int(os.environ.get("AMQP_FAULT_NODE_PORT", "5682")), 5700)


class NodeError(RuntimeError):
    """The project-owned node did not do what it was asked."""


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _short_hostname() -> str:
    try:
        out = subprocess.run(
            ["hostname", "-s"], capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        out = ""
    return out or socket.gethostname().split(".")[0]


class RabbitNode:
    """One single-node RabbitMQ on 127.0.0.1:`port`, everything under `base`."""

    def __init__(self, base: Path, port: int) -> None:
        self.base = base
        self.port = port
        self.dist_port = port + 20000
        self.name = f"amqp_listener_faults_{port}@{_short_hostname()}"
        self.url = f"amqp://guest:guest@127.0.0.1:{port}/%2F"
        self.beam_pid: int | None = None
        self._pids: set[int] = set()  # every beam pid this node ever had
        self._write_files()

    def __repr__(self) -> str:
        return f"<RabbitNode {self.name} :{self.port} pid={self.beam_pid} base={self.base}>"

    @staticmethod
    def available() -> bool:
        """Whether the RabbitMQ server and CLI binaries are installed here."""
        return os.access(SERVER, os.X_OK) and os.access(CTL, os.X_OK)

    @classmethod
    def create(cls) -> RabbitNode:
        """A node on the first AMQP port (and distribution port) nobody listens on."""
        for port in PORTS:
            if _port_free(port) and _port_free(port + 20000):
                base = Path(tempfile.mkdtemp(prefix=f"amqp-listener-faults-{port}-"))
                return cls(base, port)
        raise NodeError(f"no free port pair for a test node in {PORTS.start}..{PORTS.stop - 1}")

    # -- files and environment ------------------------------------------------------------------

    def _write_files(self) -> None:
        for sub in ("mnesia", "log", "home"):
            (self.base / sub).mkdir(parents=True, exist_ok=True)
        (self.base / "enabled_plugins").write_text("[].\n")  # no management: no 15672 clash
        (self.base / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = 127.0.0.1:{self.port}\n"
            "loopback_users = none\n"
            "vm_memory_high_watermark.relative = 0.4\n"
        )
        (self.base / "rabbitmq-env.conf").write_text("")  # not /etc/rabbitmq/rabbitmq-env.conf
        cookie = self.base / "home" / ".erlang.cookie"  # private: node and CLI share it
        cookie.write_text("".join(secrets.choice(string.ascii_uppercase) for _ in range(20)))
        cookie.chmod(0o400)

    @property
    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
        base = self.base
        env.update(
            HOME=str(base / "home"),
            RABBITMQ_NODENAME=self.name,
            RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
            RABBITMQ_NODE_PORT=str(self.port),
            RABBITMQ_DIST_PORT=str(self.dist_port),
            RABBITMQ_MNESIA_BASE=str(base / "mnesia"),
            RABBITMQ_LOG_BASE=str(base / "log"),
            RABBITMQ_CONFIG_FILE=str(base / "rabbitmq.conf"),
            RABBITMQ_ADVANCED_CONFIG_FILE=str(base / "advanced.config"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(base / "enabled_plugins"),
            RABBITMQ_CONF_ENV_FILE=str(base / "rabbitmq-env.conf"),
            RABBITMQ_PID_FILE=str(base / "pid"),
            RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}",
        )
        return env

    # -- the CLI ----------------------------------------------------------------------------------

    def ctl(self, *args: str, timeout: float = 30.0, check: bool = True) -> str:
        """Run `rabbitmqctl -n NODE ARGS` against this node; its stdout."""
        try:
            done = subprocess.run(
                [str(CTL), "-n", self.name, "-q", *args],
                env=self.env,
                capture_output=True,
                text=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired as exc:
            raise NodeError(f"rabbitmqctl {' '.join(args)} took over {timeout}s") from exc
        if check and done.returncode != 0:
            raise NodeError(
                f"rabbitmqctl {' '.join(args)} exited {done.returncode}: "
                f"{(done.stderr or done.stdout).strip()[:500]}"
            )
        return done.stdout.strip()

    def os_pid(self) -> int:
        """The OS pid of the node's beam process, asked of the node itself."""
        return int(self.ctl("eval", "list_to_integer(os:getpid()).", timeout=15))

    # -- lifecycle --------------------------------------------------------------------------------

    def start(self, timeout: float = 60.0) -> float:
        """Start the node (detached) and wait until it serves AMQP; the seconds it took."""
        started = time.monotonic()
        done = subprocess.run(
            [str(SERVER), "-detached"], env=self.env, capture_output=True, text=True, timeout=30
        )
        if done.returncode != 0:
            raise NodeError(f"rabbitmq-server -detached exited {done.returncode}: {done.stderr}")
        self.wait_serving(timeout)
        return time.monotonic() - started

    def wait_serving(self, timeout: float = 60.0) -> None:
        """Wait until the node has booted and accepts an AMQP connection."""
        deadline = time.monotonic() + timeout
        last = "not tried"
        while time.monotonic() < deadline:
            try:
                self.ctl("await_startup", "--timeout", "15", timeout=30)
                self.beam_pid = self.os_pid()
                self._pids.add(self.beam_pid)
                if self.answers():
                    return
                last = "AMQP port not answering"
            except NodeError as exc:
                last = str(exc)
            time.sleep(0.3)
        raise NodeError(f"node {self.name} not serving after {timeout}s: {last}")

    def answers(self) -> bool:
        """Whether an AMQP connection to the node opens now."""
        params = pika.URLParameters(self.url)
        params.socket_timeout = 2
        params.connection_attempts = 1
        try:
            pika.BlockingConnection(params).close()
        except (pika.exceptions.AMQPError, OSError):
            return False
        return True

    def running(self) -> bool:
        """Whether the beam process is alive and the rabbit application serves AMQP."""
        return self.beam_pid is not None and pid_alive(self.beam_pid) and self.answers()

    def stop_app(self) -> None:
        self.ctl("stop_app", timeout=60)

    def start_app(self) -> None:
        self.ctl("start_app", timeout=60)

    def kill(self, pid: int | None = None) -> int:
        """SIGKILL the node's beam process (no shutdown at all); returns the pid killed.

        `pid` is what `os_pid()` answered earlier: asking takes a CLI start-up (~1 s), so a
        test that must kill at a precise moment asks first.
        """
        pid = pid or self.os_pid()
        self._pids.add(pid)
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while pid_alive(pid):
            if time.monotonic() > deadline:
                raise NodeError(f"beam pid {pid} survived SIGKILL for 10s")
            time.sleep(0.05)
        return pid

    def ensure_serving(self) -> None:
        """Bring the node back to serving (after a test that failed half-way through)."""
        if self.running():
            return
        if self.beam_pid is not None and pid_alive(self.beam_pid):
            with contextlib.suppress(NodeError):
                self.start_app()
        else:
            self.start()
        self.wait_serving(60)

    def stop(self) -> None:
        """Stop the node politely, then by force; returns once no beam process is left."""
        if self.beam_pid is not None and pid_alive(self.beam_pid):
            with contextlib.suppress(NodeError, OSError):
                self.ctl("stop", timeout=60)
        deadline = time.monotonic() + 15
        while any(pid_alive(pid) for pid in self._pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        for pid in self._pids:
            if pid_alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while any(pid_alive(pid) for pid in self._pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        self.beam_pid = None

    def destroy(self) -> None:
        """Stop the node and delete every file it had."""
        try:
            self.stop()
        finally:
            shutil.rmtree(self.base, ignore_errors=True)
