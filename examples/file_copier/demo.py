"""End-to-end demo: start a runner, notify a few copies, show them handled and one parked,
then ask the job ledger "did it run?" for a handled message and for the parked one.

    python -m examples.file_copier.demo        (or: make demo)

Needs RabbitMQ at AMQP_URL (default amqp://guest:guest@localhost:5672/%2F). The ledger is a
SQLite file in the demo's temporary directory, unless AMQP_LISTENER_DATABASE_URL names one.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from examples.demo_kit import (
    Broker,
    DemoFailed,
    line_buffered_stdout,
    start_runner,
    stop_runner,
    wait,
)
from examples.file_copier.listeners import FileCopier
from listener.settings import get_settings

HEADERS = (
    "x-parked-reason",
    "x-attempts",
    "x-exception-type",
    "x-exception-message",
    "x-listener",
    "x-first-failure-at",
    "x-last-failure-at",
)


def main() -> int:
    line_buffered_stdout()
    broker = Broker(get_settings().url.get_secret_value())
    work = Path(tempfile.mkdtemp(prefix="file-copier-demo-"))
    for name in ("a", "b", "c"):
        (work / f"{name}.txt").write_text(f"contents of {name}\n")
    # The ledger: this process records what it notifies, the runner every attempt.
    os.environ.setdefault("AMQP_LISTENER_DATABASE_URL", f"sqlite:///{work}/ledger.db")
    get_settings.cache_clear()
    print("0. creating the ledger's tables: amqp-listener db upgrade")
    amqp_listener("db", "upgrade")

    print("1. starting the runner: amqp-listener run examples.file_copier.listeners")
    runner = start_runner(["examples.file_copier.listeners"])
    try:
        broker.wait_consuming(runner, [FileCopier])

        print("2. notifying: three copies that work, one whose source never appears")
        handled_ids = [
            FileCopier.notify(
                case_id=case_id, src=str(work / f"{name}.txt"), dst=str(work / f"{name}.copy")
            )
            for case_id, name in enumerate(("a", "b", "c"), start=1)
        ]
        missing_id = FileCopier.notify(
            case_id=4, src=str(work / "missing.txt"), dst=str(work / "d.copy")
        )

        wait(lambda: all((work / f"{n}.copy").exists() for n in "abc"), "the three copies")
        print(f"3. handled: {', '.join(sorted(p.name for p in work.glob('*.copy')))}")

        print("   the missing source is retried after 1 s and 2 s, then parked ...")
        parked: dict[str, dict[str, object]] = {}

        def missing_parked() -> dict[str, object] | None:
            parked.update(broker.parked(FileCopier.queue))
            return parked.get(missing_id)

        headers = wait(missing_parked, "the failing message to be parked", 30)
        print(f"4. parked in {FileCopier.queue}.dead: message {missing_id}")
        for key in HEADERS:
            print(f"     {key}: {headers[key]}")
        print(f"   {len(parked)} message(s) wait in {FileCopier.queue}.dead (earlier runs' too)")
    finally:
        broker.close()
        print("5. SIGTERM to the runner: it drains and exits")
        code = stop_runner(runner)
        print(f"   runner exit code: {code}")
    if code != 0:
        raise DemoFailed(f"the runner exited with code {code}")

    print(f"6. did it run? amqp-listener jobs show {handled_ids[0]}")
    amqp_listener("jobs", "show", handled_ids[0])
    print(f"7. and the parked one? amqp-listener jobs show {missing_id}")
    amqp_listener("jobs", "show", missing_id)
    return 0


def amqp_listener(*args: str) -> None:
    """Run one `amqp-listener` command, its output shown as it is."""
    command = [str(Path(sys.executable).with_name("amqp-listener")), *args]
    if subprocess.run(command, check=False).returncode != 0:
        raise DemoFailed(f"`amqp-listener {' '.join(args)}` failed")


if __name__ == "__main__":
    sys.exit(main())
