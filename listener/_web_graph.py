"""The Topology page's graph: exchanges -> listener queues -> delay queues and dead-letter
queue, laid out in columns for an inline SVG (no script, no library).

Each exchange's listeners are stacked; a listener's queue faces its delay queues and, below
them, its dead-letter queue. Edges carry what moves along them: the binding key, a retry
(and back, when due), a parked message.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from listener._web_data import TopologyRow

__all__ = ["Edge", "Graph", "Node", "layout"]

ROW = 30  # SVG units from one row to the next
NODE_HEIGHT = 20
CHAR = 6.6  # width of one character of the node font
PAD = 10  # inside a node, left and right
MARGIN = 8
GROUP_GAP = 14  # between two exchanges' groups


@dataclass(frozen=True, slots=True)
class Node:
    kind: str  # exchange, queue, delay, dead
    name: str
    x: float
    y: float
    width: float
    href: str | None = None

    @property
    def middle(self) -> float:
        return self.y + NODE_HEIGHT / 2


@dataclass(frozen=True, slots=True)
class Edge:
    kind: str  # binding, retry, parked
    source: str
    target: str
    x1: float
    y1: float
    x2: float
    y2: float
    label: str = ""


@dataclass(frozen=True, slots=True)
class Graph:
    nodes: tuple[Node, ...]
    edges: tuple[Edge, ...]
    width: float
    height: float


def layout(rows: Sequence[TopologyRow], dead_link: str = "/parked/{queue}") -> Graph:
    """The graph of `rows` (one per listener), grouped by exchange in the rows' order."""
    groups: dict[str, list[TopologyRow]] = {}
    for row in rows:
        groups.setdefault(row.exchange, []).append(row)
    widths = [
        _width(groups),
        _width(row.queue for row in rows),
        _width([*(d for row in rows for d in row.delays), *(row.dead for row in rows)]),
    ]
    keys = max((len(row.binding_key) for row in rows), default=0)
    gaps = [max(keys * CHAR + 24, 60), 60]
    xs = [MARGIN, MARGIN + widths[0] + gaps[0]]
    xs.append(xs[1] + widths[1] + gaps[1])
    nodes: list[Node] = []
    edges: list[Edge] = []
    top = MARGIN
    for exchange, members in groups.items():
        group_top = top
        queues = []
        for row in members:
            targets = [*(("delay", name) for name in row.delays), ("dead", row.dead)]
            block = len(targets) * ROW
            queue = Node("queue", row.queue, xs[1], top + (block - ROW) / 2, widths[1])
            nodes.append(queue)
            queues.append((row, queue))
            for index, (kind, name) in enumerate(targets):
                href = dead_link.format(queue=row.queue) if kind == "dead" else None
                target = Node(kind, name, xs[2], top + index * ROW, widths[2], href)
                nodes.append(target)
                edges.append(
                    Edge(
                        "parked" if kind == "dead" else "retry",
                        row.queue,
                        name,
                        queue.x + queue.width,
                        queue.middle,
                        target.x,
                        target.middle,
                    )
                )
            top += block
        source = Node("exchange", exchange, xs[0], (group_top + top - ROW) / 2, widths[0])
        nodes.append(source)
        for row, queue in queues:
            edges.append(
                Edge(
                    "binding",
                    exchange,
                    row.queue,
                    source.x + source.width,
                    source.middle,
                    queue.x,
                    queue.middle,
                    row.binding_key,
                )
            )
        top += GROUP_GAP
    width = xs[2] + widths[2] + MARGIN
    height = top - GROUP_GAP + MARGIN if groups else 0
    return Graph(tuple(nodes), tuple(edges), width, height)


def _width(names: Iterable[str]) -> float:
    longest = max((len(name) for name in names), default=0)
    return longest * CHAR + 2 * PAD
