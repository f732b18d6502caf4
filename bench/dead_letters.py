"""`python -m bench.dead_letters`: the operator commands on a large dead-letter queue.

Parks `--n` messages of 1 KiB in a fresh dead-letter queue, then times, as separate
processes of the real CLI:

* `dead list` (one page, the default 100 oldest) of all of them: seconds and peak RSS;
* `dead replay` of a second queue holding `--replay` of them: messages per second, for
  the command (process start included) and for `Operator.replay` in this process.

Goals (issue 11): the listing under 20 s with peak RSS under 150 MiB for 100,000 messages;
the replay at 2,000 msg/s or more for 10,000. The queues are deleted afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pika

from bench.wire import url as default_url
from listener.operations import Operator
from listener.settings import Settings

CLI = str(Path(sys.executable).with_name("amqp-listener"))
BODY = b'{"pad": "' + b"x" * 1010 + b'"}'


def _fill(channel: pika.adapters.blocking_connection.BlockingChannel, queue: str, n: int) -> None:
    # Unconfirmed for speed; then wait until the queue holds them all.
    for i in range(n):
        headers = {
            "x-parked-reason": "failed",
            "x-attempts": 5,
            "x-exception-type": "TimeoutError",
            "x-exception-message": f"the upstream did not answer (case {i})",
            "x-last-failure-at": f"2026-01-01T00:00:00.{i % 1000:03d}+00:00",
        }
        properties = pika.BasicProperties(message_id=f"m{i:07d}", delivery_mode=2, headers=headers)
        channel.basic_publish("", queue, BODY, properties)
    while channel.queue_declare(queue, passive=True).method.message_count < n:
        time.sleep(0.2)


def _timed(args: list[str], url: str) -> tuple[float, float, str]:
    """Run the CLI: (seconds, its peak RSS in MiB, its stdout)."""
    env = {**os.environ, "AMQP_URL": url}
    with tempfile.TemporaryFile("w+") as out:
        started = time.perf_counter()
        process = subprocess.Popen([CLI, *args], stdout=out, stderr=subprocess.PIPE, env=env)
        # wait4, not wait: it also returns the child's resource usage (ru_maxrss in KiB).
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - started
        process.returncode = os.waitstatus_to_exitcode(status)
        if process.returncode != 0:
            error = process.stderr.read().decode() if process.stderr else ""
            raise SystemExit(f"{' '.join(args)} failed: {error.strip()}")
        out.seek(0)
        return seconds, usage.ru_maxrss / 1024, out.read()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.dead_letters", description=__doc__)
    parser.add_argument("--n", type=int, default=100_000, help="messages parked (100000)")
    parser.add_argument("--replay", type=int, default=10_000, help="messages replayed (10000)")
    parser.add_argument("--url", default=default_url())
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    args = parser.parse_args()

    token = uuid.uuid4().hex[:8]
    listed, replaying = f"bench-dead-{token}", f"bench-replay-{token}"
    connection = pika.BlockingConnection(pika.URLParameters(args.url))
    channel = connection.channel()
    quorum = {"x-queue-type": "quorum"}
    for name in (listed, replaying):
        channel.queue_declare(name, durable=True, arguments=quorum)
        channel.queue_declare(
            f"{name}.dead", durable=True, arguments={**quorum, "x-delivery-limit": 2**31 - 1}
        )
    try:
        print(f"parking {args.n} messages of 1 KiB in {listed}.dead ...", file=sys.stderr)
        _fill(channel, f"{listed}.dead", args.n)
        list_s, list_rss, out = _timed(["dead", "list", listed, "--json"], args.url)
        total = json.loads(out)["total"]
        print(f"parking {args.replay} messages in {replaying}.dead ...", file=sys.stderr)
        _fill(channel, f"{replaying}.dead", args.replay)
        replay_s, replay_rss, out = _timed(["dead", "replay", replaying, "--json"], args.url)
        replayed = len(json.loads(out)["replayed"])
        _fill(channel, f"{replaying}.dead", args.replay)
        with Operator(Settings(url=args.url)) as operator:
            target = operator.target(replaying)
            started = time.perf_counter()
            in_process = len(operator.replay(target).done)
            in_process_s = time.perf_counter() - started
    finally:
        for name in (listed, replaying):
            channel.queue_delete(name)
            channel.queue_delete(f"{name}.dead")
        connection.close()
    results = {
        "dead_list": {"messages": total, "seconds": round(list_s, 2), "peak_rss_mib": list_rss},
        "dead_replay": {
            "messages": replayed,
            "seconds": round(replay_s, 2),
            "per_second": round(replayed / replay_s),
            "peak_rss_mib": replay_rss,
        },
        "replay_in_process": {
            "messages": in_process,
            "seconds": round(in_process_s, 2),
            "per_second": round(in_process / in_process_s),
        },
    }
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(f"dead list   {total:>7} parked   {list_s:6.1f} s   peak RSS {list_rss:5.0f} MiB")
    print(
        f"dead replay {replayed:>7} of them {replay_s:6.1f} s   "
        f"{replayed / replay_s:6.0f} msg/s   peak RSS {replay_rss:5.0f} MiB"
    )
    print(
        f"  in process {in_process:>7} of them {in_process_s:6.1f} s   "
        f"{in_process / in_process_s:6.0f} msg/s"
    )


if __name__ == "__main__":
    main()
