"""The `amqp-listener` command across a real process boundary: exit codes, error lines, output.

Every test runs the installed console script as a subprocess. Errors must be one line on
stderr starting "amqp-listener: error:", with exit code 2 for usage and configuration
mistakes and 1 for broker failures, and must never show a password.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pika
import pytest

REPO = Path(__file__).resolve().parent.parent
EXECUTABLE = os.path.join(os.path.dirname(sys.executable), "amqp-listener")
APP = "tests.apps.gated"
UNREACHABLE_URL = "amqp://guest:guest@127.0.0.1:1/%2F"


def cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    """Run `amqp-listener ARGS` from the repo root and wait for it."""
    return subprocess.run(
        [EXECUTABLE, *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def error_line(result: subprocess.CompletedProcess[str]) -> str:
    """The single error line on stderr (fails if there are more lines or no such line)."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got:\n{result.stderr}"
    assert lines[0].startswith("amqp-listener: error: "), lines[0]
    return lines[0]


@pytest.fixture
def app_env(unique: str, tmp_path: Path) -> dict[str, str]:
    """Environment for tests.apps.gated with this test's names; AMQP_URL is the test broker's
    (set by tests that need one)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AMQP_LISTENER_", "AMQP_URL"))}
    env.update(
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        APP_EXCHANGE=unique,
        APP_QUEUE=f"{unique}.gated",
        APP_MARKER_DIR=str(tmp_path),
    )
    return env


@pytest.fixture
def broker_env(app_env: dict[str, str], amqp_url: str, unique: str, rabbit: Any) -> dict[str, str]:
    """`app_env` pointing at the test broker; deletes what tests.apps.gated declares."""
    queue = app_env["APP_QUEUE"]
    rabbit.exchanges.add(unique)
    rabbit.queues.update({queue, f"{queue}.dead", f"{queue}.retry.100ms"})
    rabbit.track_delay_entry(queue, f"{unique}.work")
    return {**app_env, "AMQP_URL": amqp_url}


# -- run: start-up errors ----------------------------------------------------------------------


def test_running_a_module_that_does_not_exist_exits_2_naming_it(app_env):
    result = cli("run", "tests.apps.does_not_exist", env=app_env)

    assert result.returncode == 2
    line = error_line(result)
    assert "'tests.apps.does_not_exist'" in line
    assert result.stdout == ""


def test_running_a_file_path_instead_of_a_module_exits_2_saying_so(app_env):
    result = cli("run", "tests/apps/gated.py", env=app_env)

    assert result.returncode == 2
    assert "looks like a file path" in error_line(result)


def test_running_a_module_without_listeners_exits_2_with_one_clear_line(app_env):
    result = cli("run", "tests.apps.no_listeners", env=app_env)

    assert result.returncode == 2
    line = error_line(result)
    assert "no Listener subclasses found in tests.apps.no_listeners" in line


def test_running_a_wrongly_declared_listener_exits_2_naming_the_class_and_attribute(app_env):
    result = cli("run", "tests.apps.undeclared", env=app_env)

    assert result.returncode == 2
    line = error_line(result)  # one line: no traceback
    assert "tests.apps.undeclared.NoSubscription.subscribes_to is missing" in line


def test_an_unknown_listener_name_exits_2_naming_the_known_listeners(app_env):
    result = cli("run", APP, "--listener", "UnknownName", env=app_env)

    assert result.returncode == 2
    line = error_line(result)
    assert "'UnknownName'" in line
    assert "Gated" in line


@pytest.mark.parametrize("where", ["env", "flag"])
@pytest.mark.parametrize("command", ["run", "declare", "publish"])
def test_a_broker_url_that_is_not_amqp_exits_2_without_showing_the_password(
    app_env, command, where
):
    url = "http://u:p4ss@x/"
    args = [APP] if command != "publish" else ["somewhere.key", '{"n": 1}']
    env = {**app_env, "AMQP_URL": url} if where == "env" else app_env
    flag = ["--url", url] if where == "flag" else []

    result = cli(command, *args, *flag, env=env)

    assert result.returncode == 2, result.stderr
    line = error_line(result)
    assert "amqp://" in line
    assert "p4ss" not in result.stdout + result.stderr


@pytest.mark.parametrize("command", ["run", "publish"])
@pytest.mark.parametrize(
    ("where", "url", "secrets"),
    [
        ("env", "amqp://app:s3cr3t/Pa55@rabbit:5672/", ("s3cr3t", "Pa55")),
        ("flag", "amqp://app:hunter2#x@host/", ("hunter2",)),
        ("env", "amqp://app:hunter2#x@host/", ("hunter2",)),
        ("flag", "amqp://app:s3cr3t/Pa55@rabbit:5672/", ("s3cr3t", "Pa55")),
    ],
    ids=["env-slash", "flag-hash", "env-hash", "flag-slash"],
)
def test_a_url_with_an_unencoded_password_exits_2_without_any_part_of_it(
    app_env, command, where, url, secrets
):
    args = [APP] if command == "run" else ["somewhere.key", '{"n": 1}']
    env = {**app_env, "AMQP_URL": url} if where == "env" else app_env
    flag = ["--url", url] if where == "flag" else []

    result = cli(command, *args, *flag, env=env)

    for secret in secrets:
        assert secret not in result.stdout + result.stderr
    assert result.returncode == 2, result.stderr
    assert "percent-encode" in error_line(result)


def test_an_unreachable_broker_with_fail_fast_exits_1_at_once_with_one_line(app_env):
    started = time.monotonic()
    result = cli("run", APP, "--fail-fast", env={**app_env, "AMQP_URL": UNREACHABLE_URL})

    assert result.returncode == 1
    assert time.monotonic() - started < 5
    line = error_line(result)
    assert "cannot connect to amqp://guest:***@127.0.0.1:1/" in line
    assert "gave up after 1 attempt" in line
    assert "guest:guest" not in result.stderr


def test_an_unreachable_broker_is_retried_then_exits_1(app_env):
    env = {**app_env, "AMQP_URL": UNREACHABLE_URL, "AMQP_LISTENER_CONNECT_ATTEMPTS": "2"}

    result = cli("run", APP, env=env)

    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 2, result.stderr
    assert "broker not reachable (attempt 1 of 2)" in lines[0]
    assert "retrying in" in lines[0]
    assert lines[1].startswith("amqp-listener: error: cannot connect to")
    assert "gave up after 2 attempt(s)" in lines[1]
    assert "guest:guest" not in result.stderr


@pytest.mark.parametrize("command", ["declare", "publish"])
def test_declare_and_publish_against_an_unreachable_broker_exit_1_with_one_line(app_env, command):
    args = [APP] if command == "declare" else [f"{app_env['APP_EXCHANGE']}.work", '{"n": 1}']

    result = cli(command, *args, env={**app_env, "AMQP_URL": UNREACHABLE_URL})

    assert result.returncode == 1
    assert "cannot connect to amqp://guest:***@127.0.0.1:1/" in error_line(result)
    assert result.stdout == ""


@pytest.mark.parametrize("command", ["declare", "publish"])
def test_declare_and_publish_with_a_refused_password_exit_1_with_one_line_that_hides_it(
    app_env, amqp_url, command
):
    args = [APP] if command == "declare" else [f"{app_env['APP_EXCHANGE']}.work", '{"n": 1}']
    url = "amqp://guest:Sup3rS3cret@127.0.0.1:5672/%2F"

    result = cli(command, *args, env={**app_env, "AMQP_URL": url})

    assert result.returncode == 1
    assert "refused the login" in error_line(result)
    assert "Sup3rS3cret" not in result.stdout + result.stderr


def test_a_virtual_host_that_does_not_exist_exits_1_at_once_naming_the_vhost_check(
    app_env, amqp_url
):
    url = "amqp://guest:guest@127.0.0.1:5672/no_such_vhost"

    started = time.monotonic()
    result = cli("run", APP, env={**app_env, "AMQP_URL": url})

    assert result.returncode == 1
    assert time.monotonic() - started < 5  # not retried: it is not transient
    line = error_line(result)
    assert "refused access to the virtual host" in line
    assert "guest:***@" in line


def test_a_queue_held_by_an_exclusive_consumer_exits_1_with_one_line_naming_it(
    broker_env, amqp_url
):
    # Classic queues: RabbitMQ 3.10 lets a quorum queue's consumers share it even when one
    # asks for exclusive use.
    env = {**broker_env, "AMQP_LISTENER_QUEUE_TYPE": "classic"}
    declared = cli("declare", APP, env=env)
    assert declared.returncode == 0, declared.stderr
    queue = broker_env["APP_QUEUE"]
    holder = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        holder.channel().basic_consume(queue, lambda *_: None, exclusive=True)

        started = time.monotonic()
        result = cli("run", APP, env=env, timeout=15)
        took = time.monotonic() - started
    finally:
        holder.close()

    assert result.returncode == 1, result.stderr
    line = error_line(result)  # one line: no traceback
    assert repr(queue) in line
    assert "exclusive" in line
    assert took < 10


# -- declare -----------------------------------------------------------------------------------


def test_declare_creates_the_topology_and_can_run_twice(broker_env, rabbit):
    queue = broker_env["APP_QUEUE"]
    queues = [queue, f"{queue}.dead", f"{queue}.retry.100ms"]
    assert not any(rabbit.exists(name) for name in queues)

    first = cli("declare", APP, env=broker_env)
    second = cli("declare", APP, env=broker_env)

    assert first.returncode == 0, first.stderr
    assert second.returncode == 0, second.stderr
    assert first.stdout == second.stdout
    assert f"{APP}:Gated" in first.stdout
    assert all(name in first.stdout for name in queues)
    assert all(rabbit.exists(name) for name in queues)
    # The binding is in place: a message to the exchange and key lands in the queue.
    rabbit.publish(broker_env["APP_EXCHANGE"], "work", b'{"n": 1}')
    _properties, body = rabbit.wait_message(queue, timeout=5)
    assert body == b'{"n": 1}'


# -- publish -----------------------------------------------------------------------------------


def test_publish_with_invalid_json_exits_2_and_sends_nothing(broker_env, rabbit):
    assert cli("declare", APP, env=broker_env).returncode == 0

    result = cli("publish", f"{broker_env['APP_EXCHANGE']}.work", '{"n": 1', env=broker_env)

    assert result.returncode == 2
    assert "not valid JSON" in error_line(result)
    assert result.stdout == ""
    assert rabbit.count(broker_env["APP_QUEUE"]) == 0


def test_publish_to_an_address_without_a_routing_key_exits_2(broker_env):
    result = cli("publish", "no_dot_here", '{"n": 1}', env=broker_env)

    assert result.returncode == 2
    error_line(result)


def test_publish_to_a_key_no_queue_is_bound_to_exits_1(broker_env, rabbit):
    rabbit.declare_exchange(broker_env["APP_EXCHANGE"])

    result = cli("publish", f"{broker_env['APP_EXCHANGE']}.nobody", '{"n": 1}', env=broker_env)

    assert result.returncode == 1
    assert "no queue is bound" in error_line(result)
    assert result.stdout == ""


def test_publish_to_an_exchange_that_does_not_exist_exits_1(broker_env):
    result = cli("publish", f"{broker_env['APP_EXCHANGE']}.work", '{"n": 1}', env=broker_env)

    assert result.returncode == 1
    assert "does not exist" in error_line(result)


def test_publish_prints_the_message_id_and_the_message_reaches_the_bound_queue(broker_env, rabbit):
    assert cli("declare", APP, env=broker_env).returncode == 0

    result = cli("publish", f"{broker_env['APP_EXCHANGE']}.work", '{"n": 1}', env=broker_env)

    assert result.returncode == 0, result.stderr
    message_id = result.stdout.strip()
    assert message_id
    assert len(result.stdout.splitlines()) == 1
    properties, body = rabbit.wait_message(broker_env["APP_QUEUE"], timeout=5)
    assert json.loads(body) == {"n": 1}
    assert properties.message_id == message_id
    assert properties.content_type == "application/json"
    assert properties.delivery_mode == 2


# -- help --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args", [["--help"], ["run", "--help"], ["declare", "--help"], ["publish", "--help"]]
)
def test_help_exits_0(args):
    result = cli(*args)

    assert result.returncode == 0, result.stderr
    assert "Usage:" in result.stdout


def test_a_listener_whose_init_raises_stops_the_start_with_one_line(tmp_path, amqp_url):
    module = tmp_path / "badinit_app.py"
    module.write_text(
        "from listener import Listener\n"
        "class BadInit(Listener):\n"
        "    subscribes_to = 'badinit_x.k'\n"
        "    def __init__(self):\n"
        "        raise RuntimeError('no config file')\n"
        "    def handle(self, message) -> None: ...\n"
    )
    env = {**os.environ, "AMQP_URL": amqp_url, "PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO}"}
    result = subprocess.run(
        [str(Path(sys.executable).with_name("amqp-listener")), "run", "badinit_app"],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert "BadInit() raised RuntimeError: no config file" in line
