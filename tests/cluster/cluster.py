"""A real three-node RabbitMQ cluster on this machine, owned by the cluster suite.

Each node is a `faults.node.RabbitNode` with its own name, AMQP and distribution ports and
data directory; the three share one private Erlang cookie, boot in parallel, and nodes 2
and 3 join node 1 with `rabbitmqctl join_cluster`. Quorum queues declared on it get a
member on every node. The shared broker on 5672 is never touched.

    cluster = Cluster.create()
    cluster.start()                 # ~20-40 s: three boots in parallel, then two joins
    cluster.url                     # "amqp://...:5711/%2F,amqp://...:5712/%2F,..."
    cluster.leader_of("my_queue").kill()
    cluster.heal()                  # every node serving and clustered again
    cluster.destroy()
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import secrets
import string
import tempfile
import time
from pathlib import Path

from faults.node import NodeError, RabbitNode, _port_free, _short_hostname

__all__ = ["Cluster", "ClusterNode"]

#: AMQP ports tried for the three nodes (distribution ports: + 20000). Not the fault suite's.
PORTS = range(5711, 5760)


class ClusterNode(RabbitNode):
    """A node whose cookie is the cluster's, and which pauses when in a minority."""

    def __init__(self, base: Path, port: int, cookie: str) -> None:
        self.cookie = cookie
        super().__init__(base, port)
        self.name = f"amqp_listener_cluster_{port}@{_short_hostname()}"

    @property
    def endpoint(self) -> str:
        """`host:port` of its AMQP listener, as a URL and the log lines name it."""
        return f"127.0.0.1:{self.port}"

    def __repr__(self) -> str:
        return f"<ClusterNode {self.name} :{self.port} pid={self.beam_pid}>"

    def _write_files(self) -> None:
        super()._write_files()
        with (self.base / "rabbitmq.conf").open("a") as conf:
            conf.write("cluster_partition_handling = pause_minority\n")
        cookie = self.base / "home" / ".erlang.cookie"
        cookie.unlink()
        cookie.write_text(self.cookie)
        cookie.chmod(0o400)


class Cluster:
    """Three `ClusterNode`s joined into one cluster."""

    def __init__(self, nodes: list[ClusterNode]) -> None:
        self.nodes = nodes

    @classmethod
    def create(cls, size: int = 3) -> Cluster:
        """Nodes on the first free port pairs of `PORTS`, files written, nothing started."""
        cookie = "".join(secrets.choice(string.ascii_uppercase) for _ in range(24))
        nodes: list[ClusterNode] = []
        for port in PORTS:
            if len(nodes) == size:
                break
            if _port_free(port) and _port_free(port + 20000):
                base = Path(tempfile.mkdtemp(prefix=f"amqp-listener-cluster-{port}-"))
                nodes.append(ClusterNode(base, port, cookie))
        if len(nodes) < size:
            for node in nodes:
                node.destroy()
            raise NodeError(f"no {size} free port pairs in {PORTS.start}..{PORTS.stop - 1}")
        return cls(nodes)

    @property
    def url(self) -> str:
        """Every node's URL, comma-separated: what AMQP_URL holds for a cluster."""
        return ",".join(node.url for node in self.nodes)

    def start(self, timeout: float = 120.0) -> float:
        """Boot every node in parallel, join 2..n to node 1; the seconds it took."""
        started = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(len(self.nodes)) as pool:
            for boot in [pool.submit(node.start, timeout) for node in self.nodes]:
                boot.result()
        first = self.nodes[0]
        for node in self.nodes[1:]:
            node.stop_app()
            node.ctl("reset", timeout=60)
            node.ctl("join_cluster", first.name, timeout=60)
            node.start_app()
        self.wait_clustered(timeout)
        return time.monotonic() - started

    def running_names(self, via: RabbitNode | None = None) -> set[str]:
        """The names of the nodes the cluster (asked through `via`) says are running."""
        asked = via or next(node for node in self.nodes if node.running())
        out = asked.ctl("eval", "rabbit_nodes:all_running().", timeout=20)
        return {name for name in self._names(out)}

    def _names(self, erlang_list: str) -> list[str]:
        names = erlang_list.strip().strip("[]").replace("'", "").replace("\n", "")
        return [name.strip() for name in names.split(",") if name.strip()]

    def wait_clustered(self, timeout: float = 120.0) -> None:
        """Wait until every node serves AMQP and sees all of them running."""
        expected = {node.name for node in self.nodes}
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            try:
                if all(node.running() for node in self.nodes) and all(
                    self.running_names(node) == expected for node in self.nodes
                ):
                    return
                last = "not every node runs yet"
            except (NodeError, StopIteration) as exc:
                last = str(exc)
            time.sleep(0.5)
        raise NodeError(f"the cluster did not form within {timeout}s: {last}")

    def node_named(self, name: str) -> ClusterNode:
        for node in self.nodes:
            if node.name == name:
                return node
        raise NodeError(f"{name} is not a node of this cluster")

    def node_on(self, endpoint: str) -> ClusterNode:
        """The node listening on `host:port`."""
        return next(node for node in self.nodes if node.endpoint == endpoint)

    def leader_of(self, queue: str) -> ClusterNode:
        """The node that leads quorum queue `queue` now."""
        asked = next(node for node in self.nodes if node.running())
        for line in asked.ctl("list_queues", "name", "leader", "--no-table-headers").splitlines():
            name, _, leader = line.partition("\t")
            if name == queue:
                return self.node_named(leader.strip())
        raise NodeError(f"queue {queue!r} is not on the cluster")

    def move_leader(self, queue: str, to: ClusterNode) -> None:
        """Make `to` lead quorum queue `queue` (what maintenance mode does when it drains)."""
        if self.leader_of(queue) is to:
            return
        expr = (
            f'{{ok, Q}} = rabbit_amqqueue:lookup(rabbit_misc:r(<<"/">>, queue, <<"{queue}">>)), '
            f"rabbit_quorum_queue:transfer_leadership(Q, '{to.name}')."
        )
        answer = to.ctl("eval", expr, timeout=30)
        if "migrated" not in answer or "not_migrated" in answer:
            raise NodeError(f"the leader of {queue!r} did not move to {to.name}: {answer}")

    def members_of(self, queue: str) -> set[str]:
        """The nodes that hold a replica of quorum queue `queue`."""
        asked = next(node for node in self.nodes if node.running())
        for line in asked.ctl("list_queues", "name", "members", "--no-table-headers").splitlines():
            name, _, members = line.partition("\t")
            if name == queue:
                return set(self._names(members))
        raise NodeError(f"queue {queue!r} is not on the cluster")

    def heal(self) -> None:
        """Bring every node back to serving and clustered (after a test, even a failed one)."""
        for node in self.nodes:
            if not node.running():
                node.ensure_serving()
        self.wait_clustered(90)

    def destroy(self) -> None:
        """Stop every node (by force if need be) and delete its files."""
        for node in reversed(self.nodes):
            with contextlib.suppress(Exception):
                node.destroy()
