"""The compose files, checked without a Docker engine: parsed with PyYAML, then searched for
what would break at `docker compose up`. Files or directories that do not exist (build
context, Dockerfile, what it copies, bind mounts, env files), environment variables that are
not settings, `${VAR}`s with neither a default nor a word in the file's comments, host ports
used twice, dependencies on services that do not exist or have no health check, runner
commands naming modules without listeners, a RabbitMQ without a health check.

The checker is tested too, on small documents broken one way each.
"""

from __future__ import annotations

import difflib
import fnmatch
import functools
import json
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from pydantic import AliasChoices, ValidationError

from listener.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "compose"
FILES = sorted(COMPOSE.glob("*.yml"))

#: Variables the examples read besides the settings, and the file that reads each.
EXAMPLE_VARIABLES = {"PROVISIONING_STATE_DIR": "examples/provisioning/services.py"}

TOP_LEVEL_KEYS = {"name", "services", "volumes", "networks", "configs", "secrets", "include"}
SERVICE_KEYS = {
    "build", "cap_add", "cap_drop", "command", "configs", "container_name", "cpus",
    "depends_on", "deploy", "develop", "dns", "domainname", "entrypoint", "env_file",
    "environment", "expose", "extra_hosts", "healthcheck", "hostname", "image", "init",
    "labels", "links", "logging", "mem_limit", "network_mode", "networks", "platform", "ports",
    "privileged", "profiles", "pull_policy", "read_only", "restart", "scale", "secrets",
    "security_opt", "shm_size", "stdin_open", "stop_grace_period", "stop_signal", "sysctls",
    "tmpfs", "tty", "ulimits", "user", "volumes", "working_dir",
}  # fmt: skip
#: `amqp-listener run` options that take no value.
RUN_FLAGS = {"--fail-fast", "--help"}

_INTERPOLATION = re.compile(
    r"\$(?:\{(?P<braced>[A-Za-z_]\w*)(?P<operator>:?[-?+])?(?P<default>[^}]*)\}"
    r"|(?P<bare>[A-Za-z_]\w*))"
)


def setting_variables() -> dict[str, str]:
    """{environment variable: Settings field} for every setting."""
    names = {}
    for field, info in Settings.model_fields.items():
        names[f"AMQP_LISTENER_{field.upper()}"] = field
        if isinstance(info.validation_alias, AliasChoices):
            for choice in info.validation_alias.choices:
                if isinstance(choice, str) and choice.isupper():
                    names[choice] = field
    return names


# -- the checker ---------------------------------------------------------------------------


def problems(document: Any, text: str, base: Path) -> list[str]:
    """Everything wrong with one compose document; `base` is the file's directory."""
    if not isinstance(document, dict) or not isinstance(document.get("services"), dict):
        return ["no services: mapping"]
    found = [
        f"unknown top-level key {key!r}"
        for key in document
        if key not in TOP_LEVEL_KEYS and not str(key).startswith("x-")
    ]
    found += _interpolation_problems(document, text)
    services: dict[str, Any] = document["services"]
    volumes = set(document.get("volumes") or {})
    ports: dict[tuple[int, str], str] = {}
    built_images = {
        s.get("image") for s in services.values() if isinstance(s, dict) and "build" in s
    }
    for name, service in services.items():
        if not isinstance(service, dict):
            found.append(f"service {name}: not a mapping")
            continue
        here = [f"unknown key {key!r}" for key in service if key not in SERVICE_KEYS]
        here += _build_problems(service.get("build"), base)
        here += _volume_problems(service.get("volumes") or [], base, volumes)
        here += [f"env_file {path} does not exist" for path in _env_files(service, base)]
        here += _dependency_problems(service.get("depends_on") or [], services)
        for port in _host_ports(service.get("ports") or []):
            if port in ports:
                here.append(f"host port {port[0]}/{port[1]} is published by {ports[port]} too")
            ports.setdefault(port, name)
        if "build" in service or service.get("image") in built_images:
            here += _environment_problems(_environment(service))
            here += _command_problems(service.get("command"))
        if str(service.get("image", "")).startswith("rabbitmq:"):
            check = service.get("healthcheck") or {}
            if not check.get("test") or check.get("disable"):
                here.append("a RabbitMQ service needs a healthcheck (rabbitmq-diagnostics ping)")
        found += [f"service {name}: {problem}" for problem in here]
    return found


def _interpolation_problems(document: Any, text: str) -> list[str]:
    comments = "\n".join(line for line in text.splitlines() if line.lstrip().startswith("#"))
    found = []
    for value in _strings(document):
        for match in _INTERPOLATION.finditer(value.replace("$$", "")):
            variable = match["braced"] or match["bare"]
            has_default = (match["operator"] or "").lstrip(":") == "-"
            if not has_default and not re.search(rf"\b{variable}\b", comments):
                found.append(
                    f"${{{variable}}} has no default (${{{variable}:-...}}) and the file's "
                    "comments do not mention it"
                )
    return sorted(set(found))


def _strings(node: Any) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for key, value in node.items():
            yield from _strings(key)
            yield from _strings(value)
    elif isinstance(node, list):
        for item in node:
            yield from _strings(item)


def _build_problems(build: Any, base: Path) -> list[str]:
    if build is None:
        return []
    spec = {"context": build} if isinstance(build, str) else build
    context = base / spec.get("context", ".")
    if not context.is_dir():
        return [f"build context {spec.get('context')} does not exist"]
    dockerfile = context / spec.get("dockerfile", "Dockerfile")
    if not dockerfile.is_file():
        return [f"Dockerfile {spec.get('dockerfile', 'Dockerfile')} does not exist in the context"]
    ignore_file = dockerfile.with_name(dockerfile.name + ".dockerignore")
    if not ignore_file.is_file():
        ignore_file = context / ".dockerignore"
    ignored = _ignore_patterns(ignore_file)
    found = []
    for source in _copied_sources(dockerfile.read_text()):
        if not any(context.glob(source)):
            found.append(f"{dockerfile.name} copies {source}, which does not exist")
        elif _ignored(source, ignored):
            found.append(f"{dockerfile.name} copies {source}, which {ignore_file.name} leaves out")
    return found


def _copied_sources(dockerfile: str) -> list[str]:
    sources = []
    for line in dockerfile.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        if words and words[0].upper() in ("COPY", "ADD"):
            arguments = words[1:]
            if any(word.startswith("--from") for word in arguments):
                continue  # from another stage, not from the context
            sources += [word for word in arguments if not word.startswith("--")][:-1]
    return sources


def _ignore_patterns(path: Path) -> list[str]:
    if not path.is_file():
        return []
    lines = (line.strip() for line in path.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def _ignored(source: str, patterns: list[str]) -> bool:
    """Whether the build context leaves `source` out (the last matching pattern decides)."""
    path = source.strip("/").removeprefix("./")
    ignored = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        glob = pattern.removeprefix("!").strip("/")
        if fnmatch.fnmatch(path, glob) or fnmatch.fnmatch(path, glob.removeprefix("**/")):
            ignored = not negated
    return ignored


def _volume_problems(entries: list[Any], base: Path, named: set[str]) -> list[str]:
    found = []
    for entry in entries:
        if isinstance(entry, dict):
            kind, source = entry.get("type", "volume"), entry.get("source")
        else:
            parts = str(entry).split(":")
            if len(parts) == 1:
                continue  # an anonymous volume
            source = parts[0]
            kind = "bind" if source.startswith((".", "/", "~")) else "volume"
        if kind == "bind" and source and source.startswith(".") and not (base / source).exists():
            found.append(f"bind mount {source} does not exist")
        elif kind == "volume" and source and source not in named:
            found.append(f"volume {source} is not declared under the top-level volumes:")
    return found


def _env_files(service: dict[str, Any], base: Path) -> list[str]:
    entries = service.get("env_file") or []
    entries = [entries] if isinstance(entries, str | dict) else entries
    paths = [entry["path"] if isinstance(entry, dict) else entry for entry in entries]
    return [path for path in paths if not (base / path).is_file()]


def _dependency_problems(depends_on: Any, services: dict[str, Any]) -> list[str]:
    conditions = (
        dict.fromkeys(depends_on, "service_started")
        if isinstance(depends_on, list)
        else {
            name: (spec or {}).get("condition", "service_started")
            for name, spec in depends_on.items()
        }
    )
    found = []
    for name, condition in conditions.items():
        if name not in services:
            found.append(f"depends on {name}, which is not a service here")
        elif condition == "service_healthy" and not (services[name] or {}).get("healthcheck"):
            found.append(f"waits for {name} to be healthy, but {name} has no healthcheck")
    return found


def _host_ports(entries: list[Any]) -> Iterator[tuple[int, str]]:
    for entry in entries:
        if isinstance(entry, dict):
            published, protocol = entry.get("published"), entry.get("protocol", "tcp")
            if published is not None:
                yield from ((port, protocol) for port in _port_range(str(published)))
            continue
        spec = _with_defaults(str(entry))
        spec, _, protocol = spec.partition("/")
        parts = spec.rsplit(":", 2)
        if len(parts) >= 2:
            yield from ((port, protocol or "tcp") for port in _port_range(parts[-2]))


def _with_defaults(value: str) -> str:
    return _INTERPOLATION.sub(lambda m: m["default"] if m["operator"] else m[0], value)


def _port_range(spec: str) -> range:
    first, _, last = spec.partition("-")
    if not (first.isdigit() and (last or first).isdigit()):
        return range(0)  # a variable without a default: the port is not known here
    return range(int(first), int(last or first) + 1)


def _environment(service: dict[str, Any]) -> dict[str, str | None]:
    environment = service.get("environment") or {}
    if isinstance(environment, list):
        pairs = (str(item).partition("=") for item in environment)
        return {name: value if sep else None for name, sep, value in pairs}
    return {str(k): None if v is None else str(v) for k, v in environment.items()}


def _environment_problems(environment: dict[str, str | None]) -> list[str]:
    settings = setting_variables()
    found = []
    for name, value in environment.items():
        if name in EXAMPLE_VARIABLES:
            continue
        if name not in settings:
            close = difflib.get_close_matches(name, [*settings, *EXAMPLE_VARIABLES], n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            found.append(f"environment variable {name} is not a setting{hint}")
        elif value is not None and "$" not in value:
            try:
                Settings(**{settings[name]: value})
            except ValidationError as error:
                message = error.errors(include_input=False)[0]["msg"]
                found.append(f"environment variable {name}: {message}")
    return found


def _command_problems(command: Any) -> list[str]:
    words = shlex.split(command) if isinstance(command, str) else [str(w) for w in command or []]
    targets: list[list[str]] = []
    if "amqp-listener" in words and words[words.index("amqp-listener") + 1 :][:1] == ["run"]:
        modules, skip = [], False
        for word in words[words.index("amqp-listener") + 2 :]:
            if skip:
                skip = False
            elif word.startswith("-"):
                skip = "=" not in word and word not in RUN_FLAGS
            else:
                modules.append(word)
        targets.append(modules)
    if "uvicorn" in words:
        targets += [[word] for word in words[words.index("uvicorn") + 1 :] if ":" in word][:1]
    if not targets:
        return []
    report = _import(tuple(tuple(target) for target in targets))
    return [f"command: {report[' '.join(t)]}" for t in targets if report[" ".join(t)] != "ok"]


_IMPORTER = """
import importlib, json, sys
from listener import registry
report = {}
for target in json.loads(sys.argv[1]):
    try:
        if len(target) == 1 and ":" in target[0]:
            module, attribute = target[0].split(":")
            getattr(importlib.import_module(module), attribute)
        else:
            registry.discover(target)
        report[" ".join(target)] = "ok"
    except Exception as error:
        report[" ".join(target)] = f"{' '.join(target)}: {type(error).__name__}: {error}"
print(json.dumps(report))
"""


@functools.cache
def _import(targets: tuple[tuple[str, ...], ...]) -> dict[str, str]:
    """Import each target the way the container would, in a fresh interpreter."""
    environment = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-c", _IMPORTER, json.dumps(targets)],
        cwd=ROOT, env=environment, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    return dict(json.loads(result.stdout))


# -- the repository's compose files --------------------------------------------------------


def test_the_single_node_and_the_cluster_files_are_both_there() -> None:
    assert {path.name for path in FILES} >= {"docker-compose.yml", "cluster.yml"}


@pytest.mark.parametrize("path", FILES, ids=lambda path: path.name)
def test_the_compose_file_has_no_problems(path: Path) -> None:
    text = path.read_text()
    found = problems(yaml.safe_load(text), text, path.parent)
    assert found == [], f"{path.relative_to(ROOT)}:\n  " + "\n  ".join(found)


def test_the_cluster_runs_without_haproxy_and_gives_the_runner_every_node() -> None:
    document = yaml.safe_load((COMPOSE / "cluster.yml").read_text())
    services = document["services"]
    nodes = sorted(name for name in services if name.startswith("rabbit-"))
    assert len(nodes) == 3
    # HAProxy only under a profile: `docker compose up` without one starts no proxy.
    proxies = [name for name, service in services.items() if "haproxy" in str(service.get("image"))]
    assert all(services[name].get("profiles") for name in proxies)
    started = {name for name, service in services.items() if not service.get("profiles")}
    for name in started:
        depends = services[name].get("depends_on", {})
        assert not set(depends) & set(proxies), f"{name} depends on {set(depends) & set(proxies)}"
    urls = Settings(url=_environment(services["runner"])["AMQP_URL"]).urls
    assert sorted(urlsplit(url).hostname for url in urls) == nodes


def test_the_variables_the_examples_read_are_read_there() -> None:
    for variable, reader in EXAMPLE_VARIABLES.items():
        assert variable in (ROOT / reader).read_text(), f"{reader} does not read {variable}"


def test_the_settings_are_known_by_their_environment_names() -> None:
    names = setting_variables()
    assert names["AMQP_URL"] == "url"
    assert names["AMQP_LISTENER_CONSUMER_TIMEOUT"] == "consumer_timeout"


# -- the checker, on broken documents --------------------------------------------------------

SOUND = """\
# PORT: the host port of the broker.
services:
  rabbitmq:
    image: rabbitmq:3.10-management
    ports: ["${PORT}:5672", "${UI_PORT:-15672}:15672"]
    volumes:
      - ./rabbitmq/enabled_plugins:/etc/rabbitmq/enabled_plugins:ro
      - data:/var/lib/rabbitmq
    healthcheck: {test: ["CMD", "rabbitmq-diagnostics", "-q", "ping"]}
  runner:
    build: {context: .., dockerfile: compose/app.Dockerfile}
    image: app
    command: ["amqp-listener", "run", "examples.file_copier.listeners", "--workers", "2"]
    environment:
      AMQP_URL: amqp://guest:guest@rabbitmq:5672/%2F
      AMQP_LISTENER_GRACE_PERIOD: "25"
    ports: ["9100:9100"]
    depends_on: {rabbitmq: {condition: service_healthy}}
  web:
    image: app
    command: uvicorn examples.web_publisher.app:app --port 8000
    environment: ["AMQP_URL=amqp://guest:guest@rabbitmq:5672/%2F"]
    depends_on: [runner]
volumes:
  data:
"""

BROKEN = {
    "a missing build context": (
        ("context: ..", "context: ../nowhere"),
        "service runner: build context ../nowhere does not exist",
    ),
    "a missing Dockerfile": (
        ("compose/app.Dockerfile", "compose/Nope.Dockerfile"),
        "service runner: Dockerfile compose/Nope.Dockerfile does not exist in the context",
    ),
    "a missing bind mount": (
        ("./rabbitmq/enabled_plugins:", "./rabbitmq/missing_plugins:"),
        "service rabbitmq: bind mount ./rabbitmq/missing_plugins does not exist",
    ),
    "an undeclared named volume": (
        ("- data:/var", "- other:/var"),
        "service rabbitmq: volume other is not declared",
    ),
    "a missing env_file": (
        ("    command: uvicorn", "    env_file: web.env\n    command: uvicorn"),
        "service web: env_file web.env does not exist",
    ),
    "a misspelt setting": (
        ("AMQP_LISTENER_GRACE_PERIOD", "AMQP_LISTENER_GRACE"),
        "service runner: environment variable AMQP_LISTENER_GRACE is not a setting "
        "(did you mean AMQP_LISTENER_GRACE_PERIOD?)",
    ),
    "a setting with an unusable value": (
        ('GRACE_PERIOD: "25"', 'GRACE_PERIOD: "soon"'),
        "service runner: environment variable AMQP_LISTENER_GRACE_PERIOD: Input should be",
    ),
    "a variable with no default and no word in the comments": (
        ("# PORT: the host port of the broker.", "# the host port of the broker."),
        "${PORT} has no default",
    ),
    "two services on one host port": (
        ('"9100:9100"', '"15672:9100"'),
        "service runner: host port 15672/tcp is published by rabbitmq too",
    ),
    "a dependency on a service that does not exist": (
        ("depends_on: [runner]", "depends_on: [worker]"),
        "service web: depends on worker, which is not a service here",
    ),
    "waiting for a service without a healthcheck to be healthy": (
        ("depends_on: [runner]", "depends_on: {runner: {condition: service_healthy}}"),
        "service web: waits for runner to be healthy, but runner has no healthcheck",
    ),
    "a runner module that does not exist": (
        ("examples.file_copier.listeners", "examples.file_copier.nothing"),
        "service runner: command: examples.file_copier.nothing: ConfigurationError",
    ),
    "a runner module without listeners": (
        ("examples.file_copier.listeners", "examples.demo_kit"),
        "service runner: command: examples.demo_kit: ConfigurationError: no Listener subclasses",
    ),
    "a web app that is not there": (
        ("examples.web_publisher.app:app", "examples.web_publisher.app:application"),
        "service web: command: examples.web_publisher.app:application: AttributeError",
    ),
    "a broker without a healthcheck": (
        ('    healthcheck: {test: ["CMD", "rabbitmq-diagnostics", "-q", "ping"]}\n', ""),
        "service rabbitmq: a RabbitMQ service needs a healthcheck",
    ),
    "a misspelt service key": (
        ("    environment: [", "    enviroment: ["),
        "service web: unknown key 'enviroment'",
    ),
    "a misspelt top-level key": (
        ("volumes:\n  data:", "volume:\n  data:"),
        "unknown top-level key 'volume'",
    ),
}  # fmt: skip


def test_the_checker_passes_a_sound_document() -> None:
    assert problems(yaml.safe_load(SOUND), SOUND, COMPOSE) == []


@pytest.mark.parametrize("case", BROKEN)
def test_the_checker_finds(case: str) -> None:
    (old, new), expected = BROKEN[case]
    assert SOUND.count(old) == 1, f"the test's edit {old!r} does not apply"
    text = SOUND.replace(old, new)
    found = problems(yaml.safe_load(text), text, COMPOSE)
    assert any(problem.startswith(expected) or expected in problem for problem in found), found


def test_the_checker_finds_a_copy_the_dockerignore_leaves_out(tmp_path: Path) -> None:
    (tmp_path / "app").mkdir()
    (tmp_path / "Dockerfile").write_text("FROM python:3.11-slim\nCOPY app /app\n")
    (tmp_path / "Dockerfile.dockerignore").write_text("*\n!README.md\n")
    document = {"services": {"app": {"build": str(tmp_path)}}}
    assert problems(document, "", tmp_path) == [
        "service app: Dockerfile copies app, which Dockerfile.dockerignore leaves out"
    ]


def test_the_checker_refuses_a_document_without_services() -> None:
    assert problems(yaml.safe_load("version: '3'\n"), "", COMPOSE) == ["no services: mapping"]
