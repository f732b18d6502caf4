"""The other frameworks users choose between, on the framework's jobs: the peer rows.

Each peer has a module of its own (`bench.peer_faststream`, `bench.peer_dramatiq`,
`bench.peer_celery`) with three roles, every one in a process of its own:

* `consume`: the peer's worker, started the way its users start it, with a no-op handler
  that calls `RECORDER.hit()` like every other consumer of the bench;
* `fill` (peers with a message format of their own): the untimed pre-fill of a consume run,
  sent with the peer's own client so that its worker reads its own format (persistent,
  without confirms, like the parent's pre-fill of the other consume cases);
* `publish`: one untimed warm-up message, then `--count` messages one at a time, timed, and
  `{"messages": ..., "seconds": ...}` written to `--out`.

The parent tells a peer process where to work through `BENCH_EXCHANGE`, `BENCH_ROUTING_KEY`
and `BENCH_QUEUE`: its workers are started by the peer's own command, which imports the
module and takes no arguments of ours. This module imports none of the peers: the parent
reads `PEERS` without them, and `make bench` installs them (the `bench` extra).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

__all__ = ["PEERS", "Peer", "Where", "available", "main", "where"]


@dataclass(frozen=True, slots=True)
class Where:
    """The exchange, routing key and queue a peer process works on."""

    exchange: str
    routing_key: str
    queue: str


def where() -> Where:
    """Where this peer process works, as the parent set it in the environment."""
    return Where(
        os.environ["BENCH_EXCHANGE"], os.environ["BENCH_ROUTING_KEY"], os.environ["BENCH_QUEUE"]
    )


@dataclass(frozen=True, slots=True)
class Peer:
    """What the parent needs to know of one peer, without importing it.

    `consumer` is the worker's command after the interpreter (`python -m ...`). A peer with
    `own_suffixes` declares its queues itself, with arguments of its own: the parent then
    declares nothing and only deletes, after the run, the queues `own_queues` names. A peer
    with `own_format` pre-fills its consume runs itself (`fill`).
    """

    name: str
    distribution: str
    module: str
    consumer: tuple[str, ...]
    dead_suffix: str = ".dead"
    own_suffixes: tuple[str, ...] = ()
    own_format: bool = False

    def own_queues(self, queue: str) -> list[str]:
        """The queues the peer declares for `queue` itself (none: it uses the framework's)."""
        return [queue + suffix for suffix in self.own_suffixes]

    def dead_letter(self, queue: str) -> str:
        """Where a message the peer gave up on would be: empty after a checked run."""
        return queue + self.dead_suffix


PEERS: dict[str, Peer] = {
    peer.name: peer
    for peer in (
        Peer(
            "faststream",
            "faststream",
            "bench.peer_faststream",
            ("-m", "bench.peer_faststream", "consume"),
        ),
        Peer(
            "dramatiq",
            "dramatiq",
            "bench.peer_dramatiq",
            # Its defaults: one process of 8 threads. The prefetch comes from the environment.
            ("-m", "dramatiq", "bench.peer_dramatiq", "--processes", "1"),
            dead_suffix=".XQ",
            own_suffixes=("", ".DQ", ".XQ"),
            own_format=True,
        ),
        Peer(
            "celery",
            "celery",
            "bench.peer_celery",
            (
                *("-m", "celery", "-A", "bench.peer_celery", "worker", "--pool", "solo"),
                *("--without-gossip", "--without-mingle", "--without-heartbeat"),
                *("--loglevel", "WARNING"),
            ),
            own_format=True,
        ),
    )
}


def available(name: str) -> bool:
    """Whether peer `name`'s package is installed here (`pip install -e '.[bench]'`)."""
    from importlib.util import find_spec

    return find_spec(PEERS[name].distribution) is not None


def main(
    prog: str,
    publish: Callable[[Where, int], float],
    *,
    fill: Callable[[Where, int], None] | None = None,
    consume: Callable[[Where], None] | None = None,
    argv: list[str] | None = None,
) -> None:
    """The command line of a peer module: `python -m bench.peer_X ROLE ...`."""
    roles = {"publish": publish, "fill": fill, "consume": consume}
    parser = argparse.ArgumentParser(prog=prog)
    parser.add_argument("role", choices=[role for role, does in roles.items() if does])
    parser.add_argument("--count", type=int, default=0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    here = where()
    if args.role == "consume" and consume is not None:
        consume(here)
    elif args.role == "fill" and fill is not None:
        fill(here, args.count)
    else:
        if args.out is None:
            sys.exit(f"{prog}: publish needs --out")
        seconds = publish(here, args.count)
        args.out.write_text(json.dumps({"messages": args.count, "seconds": seconds}))
