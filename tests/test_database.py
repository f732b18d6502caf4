"""The framework's database: URLs, engines, and `db upgrade` (versioned, repeatable,
concurrent), on SQLite and on the real PostgreSQL."""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path

import pytest
import sqlalchemy
from support.databases import scratch_postgres
from typer.testing import CliRunner

from listener import schema
from listener.cli import app
from listener.database import create_engine, describe_error, normalize_url, redact_database_url
from listener.errors import ConfigurationError


@pytest.mark.parametrize(
    ("url", "driver"),
    [
        ("postgresql://u@h/db", "postgresql+psycopg"),
        ("postgresql+psycopg://u@h/db", "postgresql+psycopg"),
        ("postgres://u@h/db", "postgresql+psycopg"),
        ("sqlite:///ledger.db", "sqlite"),
    ],
)
def test_the_usual_url_forms_mean_psycopg_3_or_sqlite(url: str, driver: str) -> None:
    assert normalize_url(url).drivername == driver


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("mysql://u:secret@h/db", "use postgresql://"),
        ("postgresql+psycopg2://u:secret@h/db", "use postgresql://"),
        ("sqlite://", "in-memory"),
        ("sqlite:///:memory:", "in-memory"),
        ("not a url", "cannot be parsed"),
    ],
)
def test_an_unusable_url_is_refused_with_what_to_write_instead(url: str, says: str) -> None:
    with pytest.raises(ConfigurationError, match=says) as caught:
        normalize_url(url)
    assert "secret" not in str(caught.value)


def test_a_database_url_is_redacted_for_messages() -> None:
    assert redact_database_url("postgresql://u:secret@h/db") == "postgresql://u:***@h/db"
    assert redact_database_url("sqlite:///a/b.db") == "sqlite:///a/b.db"


def test_an_unreachable_database_is_one_line_without_the_password() -> None:
    url = "postgresql://postgres:secret@127.0.0.1:1/nowhere"
    engine = create_engine(url)
    with pytest.raises(sqlalchemy.exc.OperationalError) as caught:
        engine.connect()
    line = describe_error(caught.value, url)
    assert "secret" not in line
    assert "unreachable" in line
    assert "\n" not in line


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_a_database_without_the_tables_says_to_run_db_upgrade(tmp_path: Path, kind: str) -> None:
    with contextlib.ExitStack() as stack:
        url = f"sqlite:///{tmp_path}/fresh.db"
        if kind == "postgresql":
            url = stack.enter_context(scratch_postgres())
        result = CliRunner().invoke(app, ["jobs", "show", "x", "--database-url", url])
    assert result.exit_code == 1
    [line] = result.output.splitlines()
    assert "has no ledger tables" in line
    assert "amqp-listener db upgrade" in line
    assert "unreachable" not in line


def test_upgrade_creates_every_table_then_has_nothing_left_to_do(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path}/a.db")
    first = schema.upgrade(engine)
    second = schema.upgrade(engine)
    assert first.applied == tuple(schema.migrations())
    assert second.applied == ()
    assert second.versions == first.versions == _newest()
    names = set(sqlalchemy.inspect(engine).get_table_names())
    assert {table.name for table in schema.metadata.sorted_tables} <= names


def test_a_failing_step_leaves_the_database_as_it_was(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path}/a.db")
    schema.upgrade(engine)

    def broken(connection: sqlalchemy.Connection) -> None:
        connection.exec_driver_sql("CREATE TABLE half_done (x INTEGER)")
        raise RuntimeError("step 2 failed")

    step = max(schema._migrations["ledger"]) + 1
    schema.migration("ledger", step, "a broken step")(broken)
    try:
        with pytest.raises(RuntimeError):
            schema.upgrade(engine)
    finally:
        del schema._migrations["ledger"][step]
    assert "half_done" not in sqlalchemy.inspect(engine).get_table_names()
    with engine.connect() as connection:
        assert schema.current_versions(connection) == _newest()


def test_a_ledger_made_by_its_first_version_gets_the_due_time_column_on_upgrade(
    tmp_path: Path,
) -> None:
    engine = create_engine(f"sqlite:///{tmp_path}/a.db")
    schema.upgrade(engine)
    with engine.begin() as connection:  # the ledger as its first version made it
        connection.exec_driver_sql("DROP INDEX ix_amqp_listener_attempts_due")
        connection.exec_driver_sql("ALTER TABLE amqp_listener_attempts DROP COLUMN due_at")
        connection.exec_driver_sql(
            "UPDATE amqp_listener_schema SET version = 1 WHERE component = 'ledger'"
        )

    upgraded = schema.upgrade(engine)

    assert [(step.component, step.version) for step in upgraded.applied] == [("ledger", 2)]
    inspector = sqlalchemy.inspect(engine)
    columns = inspector.get_columns("amqp_listener_attempts")
    assert "due_at" in {column["name"] for column in columns}
    assert "ix_amqp_listener_attempts_due" in {
        index["name"] for index in inspector.get_indexes("amqp_listener_attempts")
    }


def _upgrade_at_once(url: str, upgraders: int) -> list[schema.Upgrade]:
    results: list[schema.Upgrade] = []
    errors: list[BaseException] = []
    start = threading.Barrier(upgraders)

    def one() -> None:
        engine = create_engine(url)  # an engine each: as separate hosts would
        try:
            start.wait()
            results.append(schema.upgrade(engine))
        except BaseException as exc:
            errors.append(exc)
        finally:
            engine.dispose()

    threads = [threading.Thread(target=one) for _ in range(upgraders)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    return results


def test_upgrades_started_at_once_on_postgresql_apply_each_step_once() -> None:
    with scratch_postgres() as url:
        results = _upgrade_at_once(url, 4)
    assert sorted(len(result.applied) for result in results) == [0, 0, 0, _steps()]


def test_upgrades_started_at_once_on_sqlite_apply_each_step_once(tmp_path: Path) -> None:
    results = _upgrade_at_once(f"sqlite:///{tmp_path}/a.db", 4)
    assert sorted(len(result.applied) for result in results) == [0, 0, 0, _steps()]


def test_db_upgrade_command_is_safe_to_repeat(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/a.db"
    runner = CliRunner()
    first = runner.invoke(app, ["db", "upgrade", "--database-url", url])
    second = runner.invoke(app, ["db", "upgrade", "--database-url", url])
    assert first.exit_code == second.exit_code == 0, first.output
    assert "applied ledger 1" in first.output
    assert "applied ledger 2" in first.output
    assert "applied" not in second.output
    assert "up to date (inbox 1, ledger 2, outbox 1)" in second.output


def test_db_upgrade_without_a_database_says_how_to_set_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("AMQP_LISTENER_DATABASE_URL", raising=False)
    result = CliRunner().invoke(app, ["db", "upgrade"])
    assert result.exit_code == 1
    assert "AMQP_LISTENER_DATABASE_URL" in result.output


def test_db_upgrade_on_an_unreachable_database_fails_in_one_line() -> None:
    url = "postgresql://postgres:secret@127.0.0.1:1/nowhere"
    result = CliRunner().invoke(app, ["db", "upgrade", "--database-url", url])
    assert result.exit_code == 1
    assert "unreachable" in result.output
    assert "secret" not in result.output


def test_the_metadata_holds_every_framework_table_for_alembic() -> None:
    names = {table.name for table in schema.metadata.sorted_tables}
    assert {"amqp_listener_schema", "amqp_listener_attempts", "amqp_listener_workers"} <= names


def _newest() -> dict[str, int]:
    """Every component at its newest version."""
    return {step.component: step.version for step in schema.migrations()}


def _steps() -> int:
    return len(schema.migrations())


def test_the_database_url_comes_from_the_environment_and_never_shows_its_password(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from listener.settings import Settings

    monkeypatch.setenv("AMQP_LISTENER_DATABASE_URL", "postgresql://app:hunter2@db/app")
    settings = Settings()
    assert settings.database_url is not None
    assert settings.database_url.get_secret_value() == "postgresql://app:hunter2@db/app"
    assert settings.redacted_database_url == "postgresql://app:***@db/app"
    assert "hunter2" not in repr(settings)
    assert settings.with_database_url("sqlite:///x.db").redacted_database_url == "sqlite:///x.db"
