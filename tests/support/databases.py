"""Real databases for tests: a uniquely named PostgreSQL database per session, SQLite files.

PostgreSQL is the local server (`POSTGRES_TEST_URL`, default postgresql://postgres@127.0.0.1
/postgres, trust auth). Without one, PostgreSQL tests are skipped locally and fail in CI.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator

import sqlalchemy
from sqlalchemy.engine import make_url

from listener import schema
from listener.database import create_engine

POSTGRES_TEST_URL = os.environ.get(
    "POSTGRES_TEST_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)


def _admin() -> sqlalchemy.Engine:
    return create_engine(POSTGRES_TEST_URL, isolation_level="AUTOCOMMIT")


def postgres_answers() -> bool:
    engine = _admin()
    try:
        with engine.connect() as connection:
            connection.exec_driver_sql("SELECT 1")
    except sqlalchemy.exc.OperationalError:
        return False
    finally:
        engine.dispose()
    return True


@contextlib.contextmanager
def scratch_postgres(prefix: str = "amqp_listener_test") -> Iterator[str]:
    """A new, empty database for the duration; yields its URL, then drops it."""
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    engine = _admin()
    try:
        with engine.connect() as connection:
            connection.exec_driver_sql(f'CREATE DATABASE "{name}"')
        yield make_url(POSTGRES_TEST_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        with engine.connect() as connection:
            connection.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        engine.dispose()


def upgraded(url: str) -> str:
    """`url`, after `db upgrade` ran on it."""
    engine = create_engine(url)
    try:
        schema.upgrade(engine)
    finally:
        engine.dispose()
    return url


def empty_ledger(url: str) -> None:
    """Delete every ledger row, keeping the tables (one PostgreSQL database per session)."""
    engine = create_engine(url)
    try:
        with engine.begin() as connection:
            for table in reversed(schema.metadata.sorted_tables):
                if table is not schema.schema_versions:
                    connection.execute(table.delete())
    finally:
        engine.dispose()
