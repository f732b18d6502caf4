"""The job ledger's databases for the cases that turn it on.

SQLite: a fresh file in each run's scratch directory. PostgreSQL: one database for the
whole bench run (`BENCH_POSTGRES_URL` names the server, default the local one), created on
first use and dropped by `close()`. Both at the newest schema (`db upgrade`).
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

__all__ = ["Ledgers"]

_SERVER = os.environ.get("BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


class Ledgers:
    """Hands out upgraded ledger databases; `close()` drops the PostgreSQL one."""

    def __init__(self) -> None:
        self._postgres: str | None = None

    def url(self, kind: str, scratch: Path) -> str:
        """An upgraded database of `kind` ("postgresql" or "sqlite") for one run."""
        if kind == "sqlite":
            return _upgraded(f"sqlite:///{scratch}/ledger.db")
        if self._postgres is None:
            name = f"bench_ledger_{uuid.uuid4().hex[:10]}"
            self._admin(f'CREATE DATABASE "{name}"')
            self._postgres = _upgraded(_with_database(name))
        return self._postgres

    def close(self) -> None:
        if self._postgres is not None:
            name = self._postgres.rsplit("/", 1)[1]
            self._admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            self._postgres = None

    @staticmethod
    def _admin(statement: str) -> None:
        from listener.database import create_engine

        engine = create_engine(_SERVER, isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as connection:
                connection.exec_driver_sql(statement)
        finally:
            engine.dispose()


def _with_database(name: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(_SERVER).set(database=name).render_as_string(hide_password=False)


def _upgraded(url: str) -> str:
    from listener import schema
    from listener.database import create_engine

    engine = create_engine(url)
    try:
        schema.upgrade(engine)
    finally:
        engine.dispose()
    return url
