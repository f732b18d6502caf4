"""Every ```python block of README.md works as written.

How a block is checked depends on what it is:

- a file of the reader's project, when its first line names one (`# myapp/listeners.py`):
  written there in a scratch project; a module is imported, a test file (`tests/test_*.py`)
  is run with pytest;
- a fragment, when the line before it is `<!-- fragment -->`: type-checked with mypy, after
  the README's modules are imported (`from myapp.listeners import *`). Names a fragment takes
  for granted are listed in the marker (`<!-- fragment: request1, order -->`) and typed `Any`;
- anything else is a program: run, in the scratch project, against the test broker.

Blocks run in fresh interpreters, each written with blank lines before it so that a
traceback's or mypy's line numbers are README.md's. Against the broker, the README's listeners
are declared first (`amqp-listener declare`) with names of their own: a unique queue prefix,
and their exchanges renamed (`case_files` becomes `<unique>_case_files`). Everything declared
is deleted afterwards.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pika
import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

_FENCE = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)
_MARKER = re.compile(r"<!--\s*fragment\s*(?::\s*(?P<names>[^>]*?))?\s*-->\s*$")
_FILE_NAME = re.compile(r"#\s*(?P<path>[\w./]+\.py)\s*$")
_EXCHANGE = re.compile(r"""subscribes_to\s*=\s*["'](?P<exchange>[^."']+)\.""")


@dataclass(frozen=True)
class Block:
    """One ```python block: its text and where it starts (the line after the fence)."""

    line: int
    code: str
    fragment: bool
    assumed: tuple[str, ...]
    path: str | None

    @property
    def kind(self) -> str:
        if self.fragment:
            return "fragment"
        if self.path is None:
            return "program"
        return "test file" if Path(self.path).name.startswith("test_") else "module"

    def padded(self, code: str | None = None, prelude: str = "") -> str:
        """The code with blank lines (and `prelude`) before it, so it starts at `line`."""
        lines = prelude.splitlines()
        if len(lines) >= self.line:
            raise AssertionError(f"README.md:{self.line}: no room for the prelude")
        return "\n".join(lines + [""] * (self.line - 1 - len(lines))) + "\n" + (code or self.code)


def blocks(text: str) -> list[Block]:
    found = []
    for match in _FENCE.finditer(text):
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        marker = _MARKER.search(before)
        code = match.group(1)
        first = code.split("\n", 1)[0]
        named = _FILE_NAME.fullmatch(first.strip())
        assumed = tuple(
            name.strip() for name in (marker["names"] or "").split(",") if name.strip()
        ) if marker else ()  # fmt: skip
        found.append(
            Block(
                line=text.count("\n", 0, match.start(1)) + 1,
                code=code,
                fragment=marker is not None,
                assumed=assumed,
                path=named["path"] if named and not marker else None,
            )
        )
    return found


BLOCKS = blocks(README.read_text())


def _id(block: Block) -> str:
    return f"line {block.line} ({block.kind})"


# -- the scratch project --------------------------------------------------------------------


@dataclass
class Project:
    """The scratch directory the README's files are written to, and how to run things there."""

    root: Path
    exchanges: dict[str, str]
    environment: dict[str, str]

    def rename(self, code: str) -> str:
        """The code with the README's exchanges renamed to this run's."""
        for exchange, renamed in self.exchanges.items():
            code = re.sub(rf"""(["']){re.escape(exchange)}\.""", rf"\g<1>{renamed}.", code)
        return code

    def run(self, *command: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            command,
            cwd=self.root,
            env=self.environment,
            capture_output=True,
            text=True,
            timeout=timeout,
        )


def _modules(project_blocks: list[Block]) -> list[str]:
    paths = (b.path for b in project_blocks if b.kind == "module" and b.path)
    return [path.removesuffix(".py").replace("/", ".") for path in paths]


@pytest.fixture(scope="module")
def project(amqp_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Project]:
    """The README's files in a scratch directory, with the README's listeners declared."""
    unique = "t" + uuid.uuid4().hex[:10]
    files = [block for block in BLOCKS if block.path]
    exchanges = {
        match["exchange"]: f"{unique}_{match['exchange']}"
        for block in files
        for match in _EXCHANGE.finditer(block.code)
        if block.kind == "module"
    }
    root = tmp_path_factory.mktemp("readme")
    environment = {
        **os.environ,
        "AMQP_URL": amqp_url,
        "AMQP_LISTENER_QUEUE_PREFIX": unique,
        "PYTHONPATH": str(root),
        # mypy does not follow the editable install's import hook: show it the source.
        "MYPYPATH": str(ROOT),
    }
    scratch = Project(root, exchanges, environment)
    for block in files:
        assert block.path is not None
        target = root / block.path
        target.parent.mkdir(parents=True, exist_ok=True)
        if block.kind == "module":  # importable as `myapp.listeners`: make `myapp` a package
            for package in Path(block.path).parents[:-1]:
                (root / package / "__init__.py").touch()
        target.write_text(block.padded(scratch.rename(block.code)))
    declared = []
    modules = _modules(files)
    if modules:
        result = scratch.run(
            str(Path(sys.executable).with_name("amqp-listener")), "declare", *modules, "--json"
        )
        assert result.returncode == 0, f"declaring the README's listeners failed:\n{result}"
        declared = json.loads(result.stdout)["declared"]
    yield scratch
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    channel = connection.channel()
    for listener in declared:
        for queue in listener["queues"]:
            channel.queue_delete(queue)
    for exchange in exchanges.values():
        channel.exchange_delete(exchange)
    connection.close()


@pytest.fixture(scope="module")
def mypy_errors(project: Project) -> dict[int, list[str]]:
    """mypy's errors in every fragment, by the README line the fragment starts at."""
    fragments = [block for block in BLOCKS if block.kind == "fragment"]
    if not fragments:
        return {}
    imports = [f"from {module} import *" for module in _modules(BLOCKS)]
    files = {}
    for block in fragments:
        prelude = "\n".join(
            [
                "from typing import Any",
                "from listener import *",
                *imports,
                *(f"{name}: Any" for name in block.assumed),
                "async def _readme_fragment() -> None:",  # so that `await` is at home
            ]
        )
        body = "".join(
            f"    {line}" if line.strip() else line for line in block.code.splitlines(True)
        )
        path = project.root / f"readme_fragment_line_{block.line}.py"
        path.write_text(block.padded(body + "    pass\n", prelude=prelude))
        files[path.name] = block.line
    output = _mypy(project, list(files))
    errors: dict[int, list[str]] = {line: [] for line in files.values()}
    elsewhere = []
    for message in output.splitlines():
        name, _, rest = message.partition(":")
        if name in files:
            errors[files[name]].append(f"README.md:{rest}")
        else:
            elsewhere.append(message)
    # The README's modules are type-checked on the way (their lines are README.md's too).
    assert elsewhere == [], "mypy found errors outside the fragments:\n" + "\n".join(elsewhere)
    return errors


def _mypy(project: Project, files: list[str]) -> str:
    """mypy's error lines for `files` (the package found as source, like the scratch files)."""
    result = project.run(
        sys.executable,
        "-m",
        "mypy",
        "--python-version=3.11",
        "--check-untyped-defs",
        "--no-error-summary",
        "--show-error-codes",
        "--no-incremental",
        *files,
        timeout=300,
    )
    assert result.returncode in (0, 1) and not result.stderr, f"mypy did not run:\n{result}"
    return result.stdout


# -- the checks -------------------------------------------------------------------------------


def test_the_readme_has_python_blocks_of_every_kind() -> None:
    kinds = {block.kind for block in BLOCKS}
    assert kinds >= {"module", "program", "fragment", "test file"}, kinds


def test_the_block_parser_reads_markers_file_names_and_lines() -> None:
    text = (
        "intro\n```python\n# app/jobs.py\nx = 1\n```\n"
        "<!-- fragment: a, b -->\n```python\na.b\n```\n"
    )
    module, fragment = blocks(text)
    assert (module.line, module.kind, module.path) == (3, "module", "app/jobs.py")
    assert (fragment.line, fragment.kind, fragment.assumed) == (8, "fragment", ("a", "b"))


def failure(block: Block, project: Project) -> str | None:
    """Run a block that is not a fragment; what went wrong, naming its README line, or None."""
    if block.kind == "module":
        result = project.run(sys.executable, "-c", f"import {_modules([block])[0]}")
    elif block.kind == "test file":
        assert block.path is not None
        result = project.run(
            sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", block.path
        )
    else:
        path = project.root / f"readme_line_{block.line}.py"
        path.write_text(block.padded(project.rename(block.code)))
        result = project.run(sys.executable, path.name)
    if result.returncode == 0:
        return None
    return (
        f"README.md:{block.line}: the {block.kind} failed (exit {result.returncode}):\n"
        f"{result.stdout}{result.stderr}"
    )


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.kind != "fragment"], ids=_id)
def test_the_block_runs(block: Block, project: Project) -> None:
    problem = failure(block, project)
    assert problem is None, problem


def test_a_program_that_fails_is_reported_at_its_readme_line(project: Project) -> None:
    block = Block(line=50, code="x = 1\n1 / 0\n", fragment=False, assumed=(), path=None)
    problem = failure(block, project)
    assert problem is not None
    assert problem.startswith("README.md:50: the program failed (exit 1):")
    assert "line 51" in problem  # the traceback counts README.md's lines
    assert "ZeroDivisionError" in problem


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.kind == "fragment"], ids=_id)
def test_the_fragment_type_checks(block: Block, mypy_errors: dict[int, list[str]]) -> None:
    errors = mypy_errors[block.line]
    assert errors == [], f"README.md:{block.line}: the fragment does not type-check:\n" + "\n".join(
        errors
    )


def test_a_fragment_with_a_mistake_is_caught(project: Project) -> None:
    """The type check can fail: a misspelt method in a fragment is an error at its line."""
    block = Block(
        line=40, code="FileCopier.notfy(case_id=1)\n", fragment=True, assumed=(), path=None
    )
    imports = "\n".join(f"from {module} import *" for module in _modules(BLOCKS))
    path = project.root / "readme_fragment_mistake.py"
    path.write_text(block.padded(prelude=imports))
    output = _mypy(project, [path.name])
    assert f"{path.name}:40: error:" in output
    assert "notfy" in output
