"""The framework's publishers, timed: `python -m bench.publish KIND --count N --out FILE`.

KIND is `notify` (one `Sink.notify()` at a time), `notify-delayed` (the same with
`delay=1`: through the shared delay levels, back to the bench's own queue), `notify-many`
(`Sink.notify_many()` per window) or `anotify-many` (`await Sink.anotify_many()` per window,
on the default asyncio loop, as in an application that did not choose uvloop). The messages
are the same dicts the baselines send; encoding and validating them is part of the
framework's time. One untimed warm-up call opens the connection first, as in the baselines.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path

from bench.apps import Sink
from bench.wire import item


def notify(count: int) -> float:
    """Seconds for `count` confirmed `notify()` calls in a row."""
    values = [item(n) for n in range(count + 1)]
    Sink.notify(values[0])
    start = time.monotonic()
    for value in values[1:]:
        Sink.notify(value)
    return time.monotonic() - start


def notify_delayed(count: int) -> float:
    """Seconds for `count` confirmed `notify(delay=1)` calls in a row. The levels are
    shared with every listener on the broker: a second's delay brings every message back to
    the bench's own queue, and nothing is left behind in them."""
    values = [item(n) for n in range(count + 1)]
    Sink.notify(values[0], delay=1)
    start = time.monotonic()
    for value in values[1:]:
        Sink.notify(value, delay=1)
    return time.monotonic() - start


def notify_many(count: int, window: int) -> float:
    """Seconds for `count` messages through `notify_many()`, `window` per call."""
    values = [item(n) for n in range(count + 1)]
    Sink.notify_many(values[:1])
    start = time.monotonic()
    for first in range(1, count + 1, window):
        Sink.notify_many(values[first : first + window])
    return time.monotonic() - start


async def anotify_many(count: int, window: int) -> float:
    """Seconds for `count` messages through `anotify_many()`, `window` per call."""
    values = [item(n) for n in range(count + 1)]
    await Sink.anotify_many(values[:1])
    start = time.monotonic()
    for first in range(1, count + 1, window):
        await Sink.anotify_many(values[first : first + window])
    return time.monotonic() - start


def main(argv: list[str] | None = None) -> None:
    """Time one publisher and write `{"messages": ..., "seconds": ...}` to `--out`."""
    parser = argparse.ArgumentParser(prog="python -m bench.publish")
    parser.add_argument("kind", choices=["notify", "notify-delayed", "notify-many", "anotify-many"])
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--window", type=int, default=1000)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.kind == "notify":
        seconds = notify(args.count)
    elif args.kind == "notify-delayed":
        seconds = notify_delayed(args.count)
    elif args.kind == "notify-many":
        seconds = notify_many(args.count, args.window)
    else:
        seconds = asyncio.run(anotify_many(args.count, args.window))
    args.out.write_text(json.dumps({"messages": args.count, "seconds": seconds}))


if __name__ == "__main__":
    main()
