"""The cases: what each measures, how its process starts, its baseline and its goal.

A case is one way of doing a job (consuming, publishing one at a time, publishing in
batches, delivering at a steady rate); cases of one job form a group and are measured
interleaved, repeat by repeat, so that a slow minute of a shared machine hits both sides of
a ratio. Every case's ratio is to a baseline measured in the same run.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass

from bench.peers import PEERS, available

__all__ = ["CASES", "GROUPS", "Case", "Goal", "installed_peers", "select"]


@dataclass(frozen=True, slots=True)
class Goal:
    """The ratio to the baseline a case must reach: at least (`>=`) or at most (`<=`)."""

    ratio: float
    at_most: bool = False

    def met(self, ratio: float) -> bool:
        return ratio <= self.ratio if self.at_most else ratio >= self.ratio

    def __str__(self) -> str:
        return f"{'<=' if self.at_most else '>='} {self.ratio:.2f}x"


@dataclass(frozen=True, slots=True)
class Case:
    """One measured way of doing a group's job.

    `listener` names the bench.apps class `amqp-listener run` hosts (framework cases);
    `baseline_argv` the arguments of `python -m bench.baselines` (hand-written cases);
    `publisher` the `python -m bench.publish` kind (framework publish cases); `peer` the
    other framework a peer case runs (`bench.peers.PEERS`).
    """

    id: str
    group: str
    label: str
    baseline: str | None = None
    goal: Goal | None = None
    listener: str = ""
    workers: int = 1
    baseline_argv: tuple[str, ...] = ()
    publisher: str = ""
    uvloop: bool = False
    #: With the job ledger on: "postgresql" or "sqlite" (see bench.measure).
    database: str = ""
    peer: str = ""

    @property
    def framework(self) -> bool:
        return bool(self.listener or self.publisher)

    @property
    def place(self) -> str:
        """The routing key and queue suffix of this case's measurements (for framework
        cases, the bench.apps class name, which the class uses for itself)."""
        return self.listener or self.peer or ("Sink" if self.publisher else self.id)


_RAW = ("consume-aio-pika",)
CASES: tuple[Case, ...] = (
    # -- consume N pre-filled messages, no-op handlers, one process unless said --
    Case("raw", "consume", "raw aio-pika, callback consumer, per-message ack", baseline_argv=_RAW),
    Case(
        "raw-uvloop",
        "consume",
        "raw aio-pika + uvloop (information)",
        baseline="raw",
        baseline_argv=(*_RAW, "--uvloop"),
        uvloop=True,
    ),
    Case(
        "pika-select",
        "consume",
        "pika SelectConnection (information)",
        baseline="raw",
        baseline_argv=("consume-pika-select",),
    ),
    Case("async", "consume", "async no-op handler", "raw", Goal(2.0), listener="AsyncNoop"),
    Case("sync", "consume", "sync no-op handler", "raw", Goal(1.5), listener="SyncNoop"),
    Case("pydantic", "consume", "pydantic-model handler (async)", "raw", listener="ModelNoop"),
    Case(
        "workers2",
        "consume",
        "async no-op, --workers 2 (vs --workers 1)",
        "async",
        Goal(1.4),
        listener="AsyncNoop",
        workers=2,
    ),
    Case(
        "async-ledger-pg",
        "consume",
        "async no-op, ledger on PostgreSQL (vs without)",
        "async",
        Goal(0.7),
        listener="AsyncNoop",
        database="postgresql",
    ),
    Case(
        "async-ledger-sqlite",
        "consume",
        "async no-op, ledger on SQLite (vs without)",
        "async",
        Goal(0.6),
        listener="AsyncNoop",
        database="sqlite",
    ),
    # the other frameworks (the `bench` extra), each as its users run it: see bench.peers
    Case(
        "faststream",
        "consume",
        "FastStream, async no-op subscriber",
        "raw",
        peer="faststream",
    ),
    Case(
        "dramatiq",
        "consume",
        "Dramatiq, async no-op actor, 1 process x 8 threads",
        "raw",
        peer="dramatiq",
    ),
    Case(
        "celery",
        "consume",
        "Celery, sync no-op task, solo pool, acks late",
        "raw",
        peer="celery",
    ),
    # -- publish one at a time, each confirmed --
    Case(
        "pika-serial",
        "serial",
        "raw pika BlockingConnection, one at a time, confirmed",
        baseline_argv=("publish-pika-serial",),
    ),
    Case(
        "notify",
        "serial",
        "notify(), one at a time",
        "pika-serial",
        Goal(0.95),
        publisher="notify",
    ),
    Case(
        "notify-ledger",
        "serial",
        "notify(), database URL set: pending rows (vs without)",
        "notify",
        Goal(0.95),
        publisher="notify",
        database="postgresql",
    ),
    Case(
        "notify-delayed",
        "serial",
        "notify(delay=1), one at a time (vs notify())",
        "notify",
        Goal(0.9),
        publisher="notify-delayed",
    ),
    Case(
        "faststream-publish",
        "serial",
        "FastStream broker.publish(), one at a time, confirmed",
        "pika-serial",
        peer="faststream",
    ),
    Case(
        "dramatiq-publish",
        "serial",
        "Dramatiq send(), one at a time, confirm_delivery",
        "pika-serial",
        peer="dramatiq",
    ),
    Case(
        "celery-publish",
        "serial",
        "Celery apply_async(), one at a time, confirm_publish",
        "pika-serial",
        peer="celery",
    ),
    # -- publish in windows, confirms pipelined --
    Case(
        "aio-pika-pipelined",
        "batch",
        "raw aio-pika, gathered publishes with confirms, windows",
        baseline_argv=("publish-aio-pika-pipelined",),
    ),
    Case(
        "aio-pika-pipelined-uvloop",
        "batch",
        "raw aio-pika pipelined + uvloop (information)",
        "aio-pika-pipelined",
        baseline_argv=("publish-aio-pika-pipelined", "--uvloop"),
        uvloop=True,
    ),
    Case(
        "notify-many",
        "batch",
        "notify_many(), one call per window",
        "aio-pika-pipelined",
        Goal(1.0),
        publisher="notify-many",
    ),
    Case(
        "anotify-many",
        "batch",
        "anotify_many(), one call per window",
        "aio-pika-pipelined",
        Goal(1.0),
        publisher="anotify-many",
    ),
    # -- end-to-end latency at a steady rate --
    Case(
        "latency-raw",
        "latency",
        "raw aio-pika callback consumer",
        baseline_argv=(*_RAW, "--latency"),
    ),
    Case(
        "latency",
        "latency",
        "async handler",
        "latency-raw",
        Goal(1.2, at_most=True),  # on p99
        listener="LatencyProbe",
    ),
)
#: The jobs, in the order they are measured.
GROUPS = ("consume", "serial", "batch", "latency")
_BY_ID = {case.id: case for case in CASES}


def uvloop_available() -> bool:
    """Whether uvloop imports here (the informational uvloop rows need it)."""
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return False
    return True


def installed_peers() -> set[str]:
    """The peers whose package imports here (the `bench` extra installs them all)."""
    return {name for name in PEERS if available(name)}


def select(ids: Sequence[str]) -> list[Case]:
    """The cases named in `ids` (all when empty; each a known id) and the baselines their
    ratios need."""
    wanted = set(ids or _BY_ID)
    for case_id in list(wanted):
        baseline = _BY_ID[case_id].baseline
        while baseline is not None:
            wanted.add(baseline)
            baseline = _BY_ID[baseline].baseline
    if not uvloop_available():
        print("bench: uvloop is not installed; skipping the uvloop rows", file=sys.stderr)
        wanted = {i for i in wanted if not _BY_ID[i].uvloop}
    missing = sorted({_BY_ID[i].peer for i in wanted if _BY_ID[i].peer} - installed_peers())
    if missing:
        print(
            f"bench: {', '.join(missing)} not installed; skipping their rows "
            "(pip install -e '.[bench]', as make bench does)",
            file=sys.stderr,
        )
        wanted = {i for i in wanted if _BY_ID[i].peer not in missing}
    return [case for case in CASES if case.id in wanted]
