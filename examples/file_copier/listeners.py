"""The classic: copy case files when asked to.

Run it:   amqp-listener run examples.file_copier.listeners
Ask it:   FileCopier.notify(case_id=1, src="/tmp/a.txt", dst="/tmp/b.txt")
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from pathlib import Path

from pydantic import BaseModel

from listener import Listener, Reject


class CopyRequest(BaseModel):
    case_id: int
    src: str
    dst: str


class FileCopier(Listener):
    subscribes_to = "case_files.copy_requested"
    max_attempts = 3
    retry_delays = (1, 2)  # seconds before attempt 2, then 3
    timeout = 30

    def handle(self, message: CopyRequest) -> None:
        destination = Path(message.dst)
        if not destination.is_absolute():
            # No retry can fix a bad request: park it at once, with the reason.
            raise Reject(f"case {message.case_id}: destination must be an absolute path")
        # A missing source may still appear (an upload in progress): the exception makes
        # the framework retry after 1 s, then 2 s, then park the message.
        shutil.copyfile(message.src, destination)

    def track(self, message: CopyRequest) -> Iterable[str]:
        # Business keys for the ledger: `FileCopier.failed_jobs("Case:4")`.
        return [f"Case:{message.case_id}"]
