"""What a worker death interrupted, written to the job ledger by its supervisor.

The supervisor knows, from the dead worker's journal (`listener.runner.blame`), which
deliveries were running when it died; the worker itself could not record their end. With a
database configured, each becomes a `worker_lost` attempt in the ledger, with the host and
pid where it ran (`listener.ledger.record_lost`).

The write is synchronous, in the supervisor's own loop: deaths are rare, a thread in a
process that forks its workers could hand them a lock held mid-write, and a child process
for one row is more machinery than the row. It is bounded instead: a database that does
not answer within a few seconds costs the supervisor that long once, and the attempt is
logged as not recorded. The ledger then keeps what the worker wrote: a `running` row for an
attempt older than its recorder's half second, which `jobs show` reports as run by a worker
that stopped reporting, not as a false "did not run".
"""

from __future__ import annotations

import datetime as dt
import logging
import socket
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from listener.runner.journal import Running
from listener.settings import Settings

if TYPE_CHECKING:
    from listener.listener import Listener

__all__ = ["ledger_recorder"]

log = logging.getLogger("listener.supervisor")

#: Seconds the supervisor waits for the database when it records a death.
_WAIT = 3


def ledger_recorder(
    listeners: Sequence[type[Listener]], settings: Settings
) -> Callable[[int, list[Running]], None] | None:
    """A function that records the deliveries a worker death interrupted, or None when no
    database is configured."""
    if settings.database_url is None:
        return None
    url = settings.database_url.get_secret_value()
    names = {cls.queue: cls.name() for cls in listeners}
    host = socket.gethostname()

    def record(pid: int, running: list[Running]) -> None:
        from listener.database import create_engine, describe_error
        from listener.ledger import LostAttempt, record_lost

        entries = [
            LostAttempt(
                message_id=entry.message_id,
                listener=names.get(entry.queue, entry.queue),
                queue=entry.queue,
                host=host,
                pid=pid,
                started_at=dt.datetime.fromtimestamp(entry.started_at, dt.UTC),
            )
            for entry in running
        ]
        if url.startswith("sqlite"):
            engine = create_engine(url, connect_args={"timeout": _WAIT})
        else:
            engine = create_engine(url, connect_args={"connect_timeout": _WAIT})
        try:
            record_lost(engine, entries)
        except Exception as exc:
            log.warning(
                "the ledger could not record the %d attempt(s) lost with worker pid=%d: %s",
                len(entries),
                pid,
                describe_error(exc, url),
            )
        finally:
            engine.dispose()

    return record
