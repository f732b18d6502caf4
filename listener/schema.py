"""The framework's tables and how `amqp-listener db upgrade` brings a database up to date.

Every framework table registers on one SQLAlchemy `MetaData`, `listener.schema.metadata`. An
application that manages its own schema with Alembic includes it beside its own:

    # alembic/env.py
    from listener.schema import metadata as listener_metadata
    target_metadata = [myapp.models.Base.metadata, listener_metadata]

Each feature (the ledger, the outbox, ...) owns a *component* with its own version number, so
that features evolve independently. A feature declares its tables on `metadata`, then its
steps, numbered from 1:

    @migration("ledger", 1, "attempts and workers")
    def _create(connection: Connection) -> None:
        create_tables(connection, [attempts, workers])

`upgrade()` runs, in one transaction per database, every step past the version recorded in
the `amqp_listener_schema` table. It is safe to run twice (done steps are skipped) and from
several hosts at once: on PostgreSQL a transaction-scoped advisory lock serialises the
upgraders; on SQLite the write lock taken at BEGIN IMMEDIATE does.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from sqlalchemy import (
    Column,
    Connection,
    DateTime,
    Integer,
    MetaData,
    String,
    Table,
    select,
    text,
)
from sqlalchemy.engine import Engine

__all__ = [
    "Migration",
    "Upgrade",
    "create_tables",
    "current_versions",
    "metadata",
    "migration",
    "migrations",
    "upgrade",
]

#: Names constraints and indexes the same way on every database, so that migrations can
#: refer to them.
metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

schema_versions = Table(
    "amqp_listener_schema",
    metadata,
    Column("component", String(64), primary_key=True),
    Column("version", Integer, nullable=False),
    Column("upgraded_at", DateTime(timezone=True), nullable=False),
)

#: Any fixed 64-bit number: the key of the PostgreSQL advisory lock upgraders share.
_ADVISORY_LOCK_KEY = 0x616D71706C6E7231


@dataclass(frozen=True, slots=True)
class Migration:
    """One step of one component's schema: run once, in order, inside the upgrade's
    transaction."""

    component: str
    version: int
    description: str
    apply: Callable[[Connection], None]


@dataclass(frozen=True, slots=True)
class Upgrade:
    """What one `upgrade()` did: the steps it ran, and every component's version after it."""

    applied: tuple[Migration, ...]
    versions: dict[str, int]


_migrations: dict[str, dict[int, Migration]] = {}


def migration(
    component: str, version: int, description: str
) -> Callable[[Callable[[Connection], None]], Callable[[Connection], None]]:
    """Register the decorated function as step `version` of `component`'s schema."""

    def register(apply: Callable[[Connection], None]) -> Callable[[Connection], None]:
        steps = _migrations.setdefault(component, {})
        if version in steps and steps[version].apply is not apply:
            raise ValueError(f"schema step {component} {version} is registered twice")
        steps[version] = Migration(component, version, description, apply)
        return apply

    return register


def migrations() -> list[Migration]:
    """Every registered step, by component, then version."""
    _load_components()
    return [
        steps[version]
        for component, steps in sorted(_migrations.items())
        for version in sorted(steps)
    ]


def create_tables(connection: Connection, tables: Iterable[Table]) -> None:
    """Create `tables` with their indexes (a helper for a component's first step)."""
    metadata.create_all(connection, tables=list(tables), checkfirst=True)


def current_versions(connection: Connection) -> dict[str, int]:
    """Each component's schema version in this database; empty before the first upgrade."""
    if not connection.dialect.has_table(connection, schema_versions.name):
        return {}
    rows = connection.execute(select(schema_versions.c.component, schema_versions.c.version))
    return {component: version for component, version in rows}


def upgrade(engine: Engine) -> Upgrade:
    """Bring the database up to the newest version of every component, in one transaction."""
    steps = migrations()
    connection = engine.connect().execution_options(sqlite_begin="IMMEDIATE")
    with connection, connection.begin():
        if connection.dialect.name == "postgresql":
            connection.execute(
                text("SELECT pg_advisory_xact_lock(:key)"), {"key": _ADVISORY_LOCK_KEY}
            )
        create_tables(connection, [schema_versions])
        versions = current_versions(connection)
        applied = []
        for step in steps:
            if step.version <= versions.get(step.component, 0):
                continue
            step.apply(connection)
            _record(connection, step, known=step.component in versions)
            versions[step.component] = step.version
            applied.append(step)
    return Upgrade(tuple(applied), versions)


def _record(connection: Connection, step: Migration, *, known: bool) -> None:
    now = dt.datetime.now(dt.UTC)
    if known:
        connection.execute(
            schema_versions.update()
            .where(schema_versions.c.component == step.component)
            .values(version=step.version, upgraded_at=now)
        )
    else:
        connection.execute(
            schema_versions.insert().values(
                component=step.component, version=step.version, upgraded_at=now
            )
        )


def _load_components() -> None:
    # Each component registers its tables and steps when imported; importing them here makes
    # `metadata` complete for Alembic as soon as this module is imported.
    from listener import inbox, ledger, outbox  # noqa: F401


_load_components()
