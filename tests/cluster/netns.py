"""A three-node cluster whose nodes live in network namespaces of their own, for partitions.

Each node runs inside namespace `alc<pid>n<i>`, joined to a bridge in the root namespace by
a veth pair, on address 10.231.<x>.<i> (the bridge is .254, so the test and the runner reach
every node). Node names are short names on made-up hosts (`rabbit@alc<i>`), resolved by an
Erlang hosts file (`ERL_INETRC`) for the nodes and the CLI alike: nothing on the machine's
own name resolution changes. Taking the host side of a node's veth down cuts that node off
from the other two and from every client (a partition); bringing it up heals it.

Only what this module created is touched: its namespaces, veths and bridge, all named with
this process's pid, removed by `destroy()`.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import string
import subprocess
import tempfile
from pathlib import Path

from faults.node import SERVER, NodeError

from cluster.cluster import Cluster, ClusterNode

__all__ = ["NamespacedCluster", "netns_refused"]

PREFIX = f"alc{os.getpid() % 100000}"
SUBNET = f"10.231.{os.getpid() % 200 + 20}"
PORT = 5672  # every node has an address of its own


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20, check=check)


def netns_refused() -> str | None:
    """Why network namespaces cannot be used here, or None when they can."""
    probe = f"{PREFIX}probe"
    try:
        done = ip("netns", "add", probe, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"`ip netns` cannot run: {exc}"
    if done.returncode != 0:
        return f"`ip netns add` was refused: {done.stderr.strip() or done.returncode}"
    ip("netns", "del", probe, check=False)
    return None


class NamespacedNode(ClusterNode):
    """A cluster node inside namespace `namespace`, at `address`:5672."""

    def __init__(self, base: Path, index: int, cookie: str) -> None:
        self.index = index
        self.namespace = f"{PREFIX}n{index}"
        self.address = f"{SUBNET}.{index}"
        self.host = f"{PREFIX}h{index}"
        super().__init__(base, PORT, cookie)
        self.name = f"rabbit@{self.host}"
        self.url = f"amqp://guest:guest@{self.address}:{PORT}/%2F"
        self.port = PORT

    def __repr__(self) -> str:
        return f"<NamespacedNode {self.name} {self.address} pid={self.beam_pid}>"

    @property
    def endpoint(self) -> str:
        return f"{self.address}:{PORT}"

    def _write_files(self) -> None:
        super()._write_files()
        conf = (self.base / "rabbitmq.conf").read_text()
        conf = conf.replace(f"127.0.0.1:{PORT}", f"{self.address}:{PORT}")
        (self.base / "rabbitmq.conf").write_text(conf)

    @property
    def env(self) -> dict[str, str]:
        env = super().env
        env.update(
            RABBITMQ_NODE_IP_ADDRESS=self.address,
            ERL_INETRC=str(self.base.parent / "inetrc"),
            RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS=(
                "-kernel inet_dist_use_interface {"
                + self.address.replace(".", ",")
                + "} -kernel net_ticktime 8"
            ),
        )
        return env

    def start(self, timeout: float = 60.0) -> float:
        done = subprocess.run(
            ["ip", "netns", "exec", self.namespace, str(SERVER), "-detached"],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=30,
        )
        if done.returncode != 0:
            raise NodeError(f"rabbitmq-server -detached exited {done.returncode}: {done.stderr}")
        self.wait_serving(timeout)
        return 0.0

    def ctl(self, *args: str, timeout: float = 30.0, check: bool = True) -> str:
        # The CLI runs in the node's namespace: it reaches that node's epmd and the node
        # even while the node is cut off.
        done = subprocess.run(
            [
                "ip",
                "netns",
                "exec",
                self.namespace,
                str(SERVER.parent / "rabbitmqctl"),
                "-n",
                self.name,
                "-q",
                *args,
            ],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and done.returncode != 0:
            raise NodeError(
                f"rabbitmqctl {' '.join(args)} exited {done.returncode}: "
                f"{(done.stderr or done.stdout).strip()[:500]}"
            )
        return done.stdout.strip()

    def cut_off(self) -> None:
        """Partition this node from everything: the host side of its veth goes down."""
        ip("link", "set", f"{self.namespace}h", "down")

    def reconnect(self) -> None:
        ip("link", "set", f"{self.namespace}h", "up")


class NamespacedCluster(Cluster):
    """Three `NamespacedNode`s on a bridge of their own."""

    bridge = f"{PREFIX}br"

    @classmethod
    def create(cls, size: int = 3) -> NamespacedCluster:
        cookie = "".join(secrets.choice(string.ascii_uppercase) for _ in range(24))
        root = Path(tempfile.mkdtemp(prefix="amqp-listener-partition-"))
        nodes = []
        for index in range(1, size + 1):
            base = root / f"n{index}"
            base.mkdir()
            nodes.append(NamespacedNode(base, index, cookie))
        (root / "inetrc").write_text(
            "".join(
                f'{{host, {{{node.address.replace(".", ",")}}}, ["{node.host}"]}}.\n'
                for node in nodes
            )
            + "{lookup, [file, native]}.\n"
        )
        cluster = cls(nodes)  # type: ignore[arg-type]
        cluster.root = root
        try:
            cluster._build_network()
        except Exception:
            cluster.destroy()
            raise
        return cluster

    def _build_network(self) -> None:
        ip("link", "add", self.bridge, "type", "bridge")
        ip("addr", "add", f"{SUBNET}.254/24", "dev", self.bridge)
        ip("link", "set", self.bridge, "up")
        for node in self.nodes:
            assert isinstance(node, NamespacedNode)
            ns, host_side, inside = node.namespace, f"{node.namespace}h", f"{node.namespace}i"
            ip("netns", "add", ns)
            ip("link", "add", host_side, "type", "veth", "peer", "name", inside)
            ip("link", "set", inside, "netns", ns)
            ip("link", "set", host_side, "master", self.bridge)
            ip("link", "set", host_side, "up")
            ip("netns", "exec", ns, "ip", "addr", "add", f"{node.address}/24", "dev", inside)
            ip("netns", "exec", ns, "ip", "link", "set", inside, "up")
            ip("netns", "exec", ns, "ip", "link", "set", "lo", "up")

    def destroy(self) -> None:
        super().destroy()
        for node in self.nodes:
            assert isinstance(node, NamespacedNode)
            # epmd, started by the node inside its namespace, would outlive it.
            for pid in ip("netns", "pids", node.namespace, check=False).stdout.split():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), 9)
            ip("link", "del", f"{node.namespace}h", check=False)
            ip("netns", "del", node.namespace, check=False)
        ip("link", "del", self.bridge, check=False)
        root = getattr(self, "root", None)
        if root is not None:
            shutil.rmtree(root, ignore_errors=True)
