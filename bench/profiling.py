"""`--profile`: Python function calls per consumed message, from the consumers' cProfile dumps.

The recorder profiles the thread of the first handler call (the event loop's) from the
first message to the N-th, so the window holds N-1 messages of steady-state consuming,
without start-up or shutdown.
"""

from __future__ import annotations

import pstats
from pathlib import Path
from typing import Any

__all__ = ["TOP", "summarize"]

#: How many functions the summary lists, by number of calls.
TOP = 15


def summarize(paths: list[Path], messages: int) -> dict[str, Any]:
    """Calls per message and the TOP functions by calls, over the dumps in `paths`."""
    stats = pstats.Stats(*(str(p) for p in paths))
    table: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    total = sum(entry[1] for entry in table.values())
    ranked = sorted(table.items(), key=lambda kv: kv[1][1], reverse=True)[:TOP]
    return {
        "messages": messages,
        "calls": total,
        "calls_per_message": total / messages,
        "top": [
            {
                "function": pstats.func_std_string(function),
                "ncalls": entry[1],
                "per_message": entry[1] / messages,
                "tottime": entry[2],
            }
            for function, entry in ranked
        ],
    }


def render(label: str, summary: dict[str, Any]) -> str:
    """The summary as text: the calls per message, then the top functions."""
    lines = [
        f"{label}: {summary['calls_per_message']:.0f} Python calls per consumed message "
        f"({summary['calls']:,} calls over {summary['messages']:,} messages)",
        f"  {'ncalls':>9} {'per msg':>8} {'tottime':>8}  function",
    ]
    for row in summary["top"]:
        lines.append(
            f"  {row['ncalls']:>9,} {row['per_message']:>8.2f} {row['tottime']:>8.3f}  "
            f"{row['function']}"
        )
    return "\n".join(lines)
