"""An idempotent listener for process-level tests of the inbox, configured from the
environment at import:

    APP_EXCHANGE      it subscribes to `<APP_EXCHANGE>.effect`
    APP_QUEUE         the queue it owns
    APP_MARKER_DIR    where it notes the deaths it caused (`died-<n>`)
    AMQP_LISTENER_DATABASE_URL   the database of the inbox and of its side effects

A message `{"n": 1, "die_after_commit": false}` inserts n into `inbox_effects`. With
`die_after_commit`, the first attempt SIGKILLs its worker right after the transaction
committed and before the ack: the broker delivers the message again.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from pydantic import BaseModel
from sqlalchemy import event
from sqlalchemy.orm import Session

from listener import Listener

effects = sa.Table(
    "inbox_effects",
    sa.MetaData(),
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("n", sa.Integer, nullable=False),
)


class Effect(BaseModel):
    n: int
    die_after_commit: bool = False


class Effects(Listener, abstract=True):
    """Concrete only in the runner (below): the tests import `effects` alone."""

    idempotent = True
    retry_delays = (0.1,)

    def handle(self, message: Effect, session: Session) -> None:
        session.execute(effects.insert().values(n=message.n))
        marker = Path(os.environ["APP_MARKER_DIR"]) / f"died-{message.n}"
        if message.die_after_commit and not marker.exists():
            marker.touch()
            event.listen(session, "after_commit", _die)


def _die(_session: Any) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


if "APP_EXCHANGE" in os.environ:

    class AppEffects(Effects):
        subscribes_to = f"{os.environ['APP_EXCHANGE']}.effect"
        queue = os.environ["APP_QUEUE"]
