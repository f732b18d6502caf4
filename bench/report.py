"""The results as rows (value, baseline, ratio, goal), a text table and a JSON document."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any

from bench.cases import Case, Goal

__all__ = ["CaseResult", "Row", "rows", "table"]

_GROUP_TITLES = {
    "consume": "consume N pre-filled persistent messages (quorum queue, manual ack)",
    "serial": "publish one at a time, each confirmed",
    "batch": "publish in windows, confirms pipelined",
    "latency": "end-to-end latency at a steady rate, publisher to handler",
    "memory": "peak RSS per worker process (VmHWM, highest of the repeats)",
}
#: The cases whose worker memory gets a row, with the row's label.
_RSS_ROWS = {
    "raw": "raw aio-pika consumer",
    "async": "amqp-listener worker, async no-op, --workers 1",
    "workers2": "amqp-listener worker, async no-op, --workers 2 (the larger)",
    "faststream": "FastStream worker",
    "dramatiq": "Dramatiq worker process (1 of 1)",
    "celery": "Celery worker, solo pool",
}


@dataclass
class CaseResult:
    """The runs of one case, and why it stopped early if it did."""

    case: Case
    runs: list[dict[str, Any]] = field(default_factory=list)
    status: str = "ok"  # ok, timed out, failed
    error: str = ""
    spent: float = 0.0
    #: What its runs declared (and deleted): a caller can check that nothing is left.
    declared: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "error": self.error,
            "runs": self.runs,
            "declared": self.declared,
        }


@dataclass
class Row:
    """One line of the table."""

    id: str
    group: str
    label: str
    unit: str
    value: float | None
    status: str
    baseline: str | None = None
    baseline_value: float | None = None
    goal: Goal | None = None
    #: The value of each run, in repeat order (empty where runs are not paired: memory).
    samples: list[float] = field(default_factory=list)
    #: The median over repeats of run i's value over the baseline's run i (see `ratio`).
    paired_ratio: float | None = None

    @property
    def ratio(self) -> float | None:
        """The value over the baseline's (1.0 on a baseline's own row).

        Where both have one run per repeat, the median of the per-repeat ratios: a case and
        its baseline run side by side in each repeat, so a ratio of two runs made minutes
        apart (what a ratio of two medians can be) does not carry the broker's drift.
        """
        if self.value is None:
            return None
        if self.baseline is None:
            return 1.0
        if self.paired_ratio is not None:
            return self.paired_ratio
        if not self.baseline_value:
            return None
        return self.value / self.baseline_value

    @property
    def met(self) -> bool | None:
        ratio = self.ratio
        return None if self.goal is None or ratio is None else self.goal.met(ratio)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "group": self.group,
            "label": self.label,
            "unit": self.unit,
            "value": self.value,
            "status": self.status,
            "baseline": self.baseline,
            "baseline_value": self.baseline_value,
            "ratio": self.ratio,
            "goal": str(self.goal) if self.goal else None,
            "met": self.met,
        }


def rows(results: list[CaseResult]) -> list[Row]:
    """Every row, in table order, with medians over the runs and ratios to baselines."""
    made: list[Row] = []
    for result in results:
        case = result.case
        if case.group != "latency":
            value = _median(result, "rate")
            made.append(
                Row(
                    case.id,
                    case.group,
                    case.label,
                    "msgs/s",
                    value,
                    result.status,
                    case.baseline,
                    goal=case.goal,
                    samples=_samples(result, "rate"),
                )
            )
            continue
        for key in ("p50", "p99"):  # a latency case's goal is on its p99
            made.append(
                Row(
                    f"{case.id}-{key}",
                    case.group,
                    f"{key}, {case.label}",
                    "ms",
                    _median(result, f"{key}_ms"),
                    result.status,
                    f"{case.baseline}-{key}" if case.baseline else None,
                    goal=case.goal if key == "p99" else None,
                    samples=_samples(result, f"{key}_ms"),
                )
            )
    for result in results:
        if result.case.id in _RSS_ROWS:
            peak = max((kib for run in result.runs for kib in run["rss_kib"]), default=None)
            made.append(
                Row(
                    f"rss-{result.case.id}",
                    "memory",
                    _RSS_ROWS[result.case.id],
                    "MiB",
                    peak / 1024 if _ok(result) and peak else None,
                    result.status,
                    None if result.case.id == "raw" else "rss-raw",
                )
            )
    by_id = {row.id: row for row in made}
    for row in made:
        if row.baseline in by_id:
            base = by_id[row.baseline]
            row.baseline_value = base.value
            pairs = list(zip(row.samples, base.samples, strict=False))
            if pairs and len(row.samples) == len(base.samples) and all(b for _a, b in pairs):
                row.paired_ratio = statistics.median(a / b for a, b in pairs)
    return made


def _samples(result: CaseResult, key: str) -> list[float]:
    """`key` of every run, in repeat order; empty for a case that timed out or failed."""
    return [run[key] for run in result.runs] if _ok(result) else []


def _ok(result: CaseResult) -> bool:
    return result.status == "ok" and bool(result.runs)


def _median(result: CaseResult, key: str) -> float | None:
    """The median of `key` over the runs; None for a case that timed out or failed."""
    if not _ok(result):
        return None
    return statistics.median(run[key] for run in result.runs)


def _number(value: float | None, unit: str, status: str) -> str:
    if value is None:
        return status if status != "ok" else "-"
    if unit == "msgs/s":
        return f"{value:,.0f}"
    return f"{value:.2f} {unit}"


def table(made: list[Row], header: list[str]) -> str:
    """The rows as an aligned text table under `header` lines."""
    titles = ("case", "msgs/s (median)", "baseline", "ratio", "goal", "met?")
    lines: list[tuple[str, ...]] = []
    group = ""
    for row in made:
        if row.group != group:
            group = row.group
            lines.append((_GROUP_TITLES[group],))
        ratio = row.ratio
        lines.append(
            (
                "  " + row.label,
                _number(row.value, row.unit, row.status),
                _number(row.baseline_value, row.unit, "-") if row.baseline else "(baseline)",
                f"{ratio:.2f}x" if ratio is not None else "-",
                str(row.goal) if row.goal else "",
                {True: "yes", False: "NO", None: ""}[row.met],
            )
        )
    full = [line for line in lines if len(line) == len(titles)]
    widths = [max(len(line[i]) for line in [titles, *full]) for i in range(len(titles))]

    def fmt(line: tuple[str, ...]) -> str:
        if len(line) == 1:
            return line[0]
        cells = [line[0].ljust(widths[0])] + [
            cell.rjust(width) for cell, width in zip(line[1:], widths[1:], strict=True)
        ]
        return "  ".join(cells).rstrip()

    rule = "-" * (sum(widths) + 2 * (len(widths) - 1))
    return "\n".join([*header, "", fmt(titles), rule, *(fmt(line) for line in lines)])
