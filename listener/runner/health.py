"""`run --health-port PORT`: liveness and readiness probes for Kubernetes.

    GET /livez   200 while the supervisor runs and is not stopping; 503 otherwise
    GET /readyz  200 while every worker consumes on every listener; 503 otherwise (starting,
                 reconnecting, a consumer being re-subscribed, paused, stopping)

Both answer a small JSON document (`status`, `workers`, `ready`, `paused`, `stopping`,
`reloading`, `detail`), for people; probes only read the status code. A `livenessProbe` on
`/livez` restarts a pod whose supervisor hangs; a `readinessProbe` on `/readyz` shows a
pod that takes no work (a consumer of a queue gets no traffic from a Service, so readiness is
for dashboards, rollouts and alerts: `kubectl rollout status` waits until new pods consume).

How it is served, and why:

- **From a process of its own, like the metrics endpoint.** The supervisor forks workers, and
  forking is only safe from a process that runs no other thread; an HTTP server thread in the
  supervisor would break that (see `listener.metrics`). So the supervisor binds the port at
  start-up (a port in use is a start-up error, exit 2) and forks a small serving process,
  supervised like the metrics one: restarted with back-off if it dies, killed at the end,
  dead with the supervisor (PDEATHSIG). It reuses the metrics endpoint's server class (a
  threading HTTP server on an already listening socket): it may use threads, since it never
  forks. It is forked before the start-up broker check, so `/livez` answers (and `/readyz`
  says 503) while the broker is still out of reach.
- **State flows one way, through a pipe.** The supervisor knows what its workers reported
  (each worker sends "ready", "paused" or "not-ready <reason>" on its status pipe whenever
  that changes). It writes the resulting state as one JSON line (shorter than PIPE_BUF, so
  each write is atomic) to a pipe the serving process reads in a thread: whenever something
  changes, and once per supervision tick as a heartbeat. The writes never block (a full pipe
  drops the line; the next one carries the whole state again). A supervisor that stops
  writing for `STALE_AFTER` seconds (hung, not dead: a dead one takes the serving process
  with it) makes both probes fail.
- **It survives a reload.** On SIGHUP the supervisor re-executes itself (see
  `listener.runner.reload`); the listening socket, both ends of the pipe and the serving
  process are handed to the new image, so the probes keep answering throughout (`/readyz`
  stays 200 while the old workers consume and their replacements start).
"""

from __future__ import annotations

import contextlib
import http.server
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from listener.metrics import _Server, bind_port

__all__ = ["LIVE_PATH", "READY_PATH", "STALE_AFTER", "HealthEndpoint"]

log = logging.getLogger("listener.health")

LIVE_PATH = "/livez"
READY_PATH = "/readyz"
#: Seconds without a word from the supervisor after which both probes fail. It writes at
#: least once a second while it supervises; the longest silence of a healthy supervisor is a
#: start-up broker check (a connect may take 10 s) or a reload's re-exec and imports.
STALE_AFTER = 30.0
#: One state line must fit one atomic pipe write.
_LINE_MAX = 4096


class HealthEndpoint:
    """Liveness and readiness on one port (see the module docstring).

    The supervisor drives it: `open()` before anything is forked, `serve()` in the forked
    serving process, `release()` in every other forked process, `publish()` on each change
    and tick, `handoff()`/`adopt()` across a re-exec, `close()` at the end.
    """

    def __init__(self, port: int, host: str = "0.0.0.0") -> None:
        self.host = host
        self.port = port
        self._socket: socket.socket | None = None
        self._read_fd: int | None = None
        self._write_fd: int | None = None

    @property
    def url(self) -> str:
        """Where the probes answer (the bound port, once open)."""
        return f"http://{self.host}:{self.port}"

    @property
    def is_open(self) -> bool:
        return self._socket is not None

    def open(self) -> None:
        """Bind the port and create the state pipe. Idempotent.

        Raises:
            ConfigurationError: the port cannot be bound (in use, not permitted).
        """
        if self._socket is not None:
            return
        sock = bind_port(self.host, self.port, "health checks")
        self._socket = sock
        self.port = sock.getsockname()[1]
        self._read_fd, self._write_fd = os.pipe()
        os.set_blocking(self._write_fd, False)

    def publish(self, state: Mapping[str, Any]) -> None:
        """Tell the serving process the supervisor's state (never blocks)."""
        if self._write_fd is None:
            return
        line = json.dumps(state, separators=(",", ":")).encode()[: _LINE_MAX - 1] + b"\n"
        with contextlib.suppress(OSError):  # full (the server is slow or down): next tick
            os.write(self._write_fd, line)

    def release(self) -> None:
        """In a forked process that does not serve: close its copies of the socket and pipe."""
        if self._socket is not None:
            with contextlib.suppress(OSError):
                self._socket.close()
            self._socket = None
        for fd in (self._read_fd, self._write_fd):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._read_fd = self._write_fd = None

    def close(self) -> None:
        """Close everything (the supervisor, at the end). Idempotent."""
        self.release()

    def handoff(self) -> dict[str, Any]:
        """Before a re-exec: keep the socket and the pipe open in the new image."""
        if self._socket is None or self._read_fd is None or self._write_fd is None:
            raise RuntimeError("HealthEndpoint.handoff() before open()")
        fds = (self._socket.fileno(), self._read_fd, self._write_fd)
        for fd in fds:
            os.set_inheritable(fd, True)
        return {"host": self.host, "port": self.port, "fds": list(fds)}

    @classmethod
    def adopt(cls, info: Mapping[str, Any]) -> HealthEndpoint:
        """After a re-exec: the endpoint `handoff()` described, still open."""
        sock_fd, read_fd, write_fd = (int(fd) for fd in info["fds"])
        endpoint = cls(int(info["port"]), str(info["host"]))
        for fd in (sock_fd, read_fd, write_fd):
            os.set_inheritable(fd, False)
        endpoint._socket = socket.socket(fileno=sock_fd)
        endpoint._read_fd, endpoint._write_fd = read_fd, write_fd
        return endpoint

    def serve(self) -> None:
        """In the serving process: answer probes until killed."""
        if self._socket is None or self._read_fd is None or self._write_fd is None:
            raise RuntimeError("HealthEndpoint.serve() before open()")
        with contextlib.suppress(OSError):
            os.close(self._write_fd)
        self._write_fd = None
        latest = _Latest()
        reader = threading.Thread(
            target=latest.follow, args=(self._read_fd,), name="health-state", daemon=True
        )
        reader.start()
        server = _Server(self._socket, _handler(latest))
        server.serve_forever()


class _Latest:
    """The last state line the supervisor wrote, and when it came."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._state: dict[str, Any] | None = None
        self._at = 0.0

    def follow(self, fd: int) -> None:
        pending = b""
        while True:
            try:
                chunk = os.read(fd, 65536)
            except InterruptedError:
                continue
            except OSError:
                chunk = b""
            if not chunk:  # every writer is gone: the supervisor died
                with self._lock:
                    self._state = None
                return
            *lines, pending = (pending + chunk).split(b"\n")
            for line in reversed(lines):
                try:
                    state = json.loads(line)
                except ValueError:
                    continue
                if isinstance(state, dict):
                    with self._lock:
                        self._state, self._at = state, time.monotonic()
                    break

    def read(self) -> tuple[dict[str, Any] | None, float]:
        with self._lock:
            return self._state, time.monotonic() - self._at


def _handler(latest: _Latest) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        server_version = "amqp-listener"
        sys_version = ""

        def do_GET(self) -> None:
            self._answer(body=True)

        def do_HEAD(self) -> None:
            self._answer(body=False)

        def _answer(self, *, body: bool) -> None:
            path = urlsplit(self.path).path.rstrip("/")
            if path not in (LIVE_PATH, READY_PATH):
                self._send(404, {"status": "not found", "paths": [LIVE_PATH, READY_PATH]}, body)
                return
            state, age = latest.read()
            if state is None:
                self._send(503, {"status": "starting", "detail": "no word yet"}, body)
                return
            document = dict(state)
            live = bool(state.get("live")) and age < STALE_AFTER
            if age >= STALE_AFTER:
                document["detail"] = f"the supervisor has not answered for {age:.0f}s"
            ok = live if path == LIVE_PATH else live and bool(state.get("ready"))
            if path == LIVE_PATH:
                document["status"] = "live" if ok else "not live"
            else:
                document["status"] = "ready" if ok else "not ready"
            self._send(200 if ok else 503, document, body)

        def _send(self, code: int, document: dict[str, Any], body: bool) -> None:
            data = json.dumps(document).encode() + b"\n"
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            if body:
                self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # probes every few seconds would flood the log

    return Handler
