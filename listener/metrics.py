"""Prometheus metrics: a middleware that counts every delivery, and the `--metrics-port` endpoint.

`Metrics` is ordinary middleware (see `listener.middleware`): it counts what its hooks see,
per listener (`listener` label: the class name). Embedded in a program of your own, install
it and serve its registry however you like:

    metrics = Metrics()                       # its own registry, not prometheus_client's global
    listener.add_middleware(metrics)
    prometheus_client.start_http_server(9100, registry=metrics.registry)

`amqp-listener run --metrics-port PORT` does this for you, for every worker of the
supervisor, with one endpoint that adds up all of them. How that works, and why:

- **Multiprocess mode.** Each worker is a process of its own, so its counters live in its
  own memory. prometheus_client's multiprocess mode makes each process write its values to
  memory-mapped files in the directory named by `PROMETHEUS_MULTIPROC_DIR`, and
  `MultiProcessCollector` adds the files up at scrape time. `MultiprocessEndpoint.open()`
  creates a private directory for that (mode 0700, removed when the run ends) and points the
  variable at it. prometheus_client chooses between in-memory and file-backed values **once,
  when `prometheus_client.values` is first imported** (`values.ValueClass`), so the variable
  must be set before anything imports prometheus_client. Hence: this module imports
  prometheus_client only inside functions; the CLI opens the endpoint before it imports the
  application's modules (which may create metrics of their own at import; those are then
  file-backed too and served on the same endpoint); and `open()`, for callers that cannot
  keep that order, switches an already imported `values.ValueClass` to the file-backed one
  (metrics created before that stay in-memory and are not served).
- **Workers that die.** Counters and histograms of a dead worker stay in its files, so totals
  never go down when a worker is replaced. The in-flight gauge adds up live processes only
  (`multiprocess_mode="livesum"`): the supervisor calls `mark_process_dead(pid)` for every
  worker it reaps, which removes that worker's gauge file.
- **Serving from a child process, not a thread.** The supervisor forks workers, and forking
  is only safe from a process with no other thread (a thread holding a lock at the fork
  leaves that lock held forever in the child). An HTTP server thread in the supervisor would
  break that, so the endpoint is served by a small process of its own, forked by the
  supervisor like a worker: it dies with the supervisor (PDEATHSIG), is restarted with
  back-off if it dies, and is killed at shutdown. It may use threads freely, since it never
  forks. The listening socket is bound by the supervisor before any fork, which makes a port
  already in use a start-up error (one line, exit 2) rather than a crash loop, keeps the port
  across restarts of the serving process (connections wait in the backlog meanwhile), and
  lets `--metrics-port 0` pick a free port that the supervisor logs. Workers close their copy
  of the socket right after the fork.

Metric names and labels are listed in README.md (Operating, Metrics). Labels carry listener
class names, outcomes and park reasons only: never a body, a header value or a URL.
"""

from __future__ import annotations

import atexit
import contextlib
import http.server
import logging
import os
import shutil
import socket
import socketserver
import tempfile
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from listener.errors import ConfigurationError
from listener.middleware import Delivery, Middleware

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

    from listener.outcome import Failure
    from listener.runner.worker import Worker

__all__ = ["DURATION_BUCKETS", "ENV_VAR", "Metrics", "MultiprocessEndpoint"]

log = logging.getLogger("listener.metrics")

#: The variable prometheus_client reads to enable its multiprocess mode.
ENV_VAR = "PROMETHEUS_MULTIPROC_DIR"
#: Handler duration buckets (seconds): prometheus_client's defaults, extended to the long
#: timeouts listeners are allowed (a `timeout = 60` handler must not land in +Inf only).
DURATION_BUCKETS = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
)

_STATE_KEY = "metrics.in_flight"


@dataclass(frozen=True, slots=True)
class _Series:
    """One listener's unlabelled-beyond-`listener` children, looked up once."""

    received: Any
    handled: Any
    failed: Any
    retried: Any
    timed_out: Any
    in_flight: Any


class Metrics(Middleware):
    """Counts deliveries per listener into a Prometheus registry.

    Args:
        registry: where the metrics are registered; a new private `CollectorRegistry` when
            None (never prometheus_client's global one, so two instances never clash).
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry() if registry is None else registry
        per_listener = ("listener",)

        def counter(name: str, text: str, labels: tuple[str, ...] = per_listener) -> Counter:
            return Counter(name, text, labels, registry=self.registry)

        self.received = counter(
            "amqp_listener_messages_received_total", "Deliveries taken from the listener's queue."
        )
        self.handled = counter(
            "amqp_listener_messages_handled_total", "Deliveries whose handler returned (acked)."
        )
        self.failed = counter(
            "amqp_listener_messages_failed_total",
            "Attempts that ended in a failure: an exception, a time-out, Retry, Reject, a body "
            "that could not be decoded, or a message parked after workers died on it.",
        )
        self.retried = counter(
            "amqp_listener_messages_retried_total",
            "Failed attempts moved to a delay queue for another attempt.",
        )
        self.parked: Counter = counter(
            "amqp_listener_messages_parked_total",
            "Messages moved to the listener's dead-letter queue, by reason.",
            ("listener", "reason"),
        )
        self.timed_out = counter(
            "amqp_listener_messages_timed_out_total",
            "Attempts that outlived the listener's timeout.",
        )
        self.duration: Histogram = Histogram(
            "amqp_listener_handler_duration_seconds",
            "Seconds from taking a delivery to settling it (decode, handle, ack or move), "
            "by outcome: handled, retried, parked, returned.",
            ("listener", "outcome"),
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        self.in_flight: Gauge = Gauge(
            "amqp_listener_messages_in_flight",
            "Deliveries being handled now.",
            per_listener,
            registry=self.registry,
            multiprocess_mode="livesum",
        )
        self._series: dict[str, _Series] = {}

    def _for(self, name: str) -> _Series:
        series = self._series.get(name)
        if series is None:
            series = self._series[name] = _Series(
                self.received.labels(name),
                self.handled.labels(name),
                self.failed.labels(name),
                self.retried.labels(name),
                self.timed_out.labels(name),
                self.in_flight.labels(name),
            )
        return series

    def on_worker_start(self, worker: Worker) -> None:
        # Every listener's series exists from the start, at 0, so that rate() and alerts
        # work before the first message (and a listener that never fails still shows 0).
        for cls in worker.listeners:
            self._for(cls.__name__)

    def before_handle(self, delivery: Delivery) -> None:
        series = self._for(delivery.listener.__name__)
        series.received.inc()
        series.in_flight.inc()
        delivery.state[_STATE_KEY] = True

    def after_handle(
        self, delivery: Delivery, *, outcome: str, failure: Failure | None, duration: float
    ) -> None:
        name = delivery.listener.__name__
        series = self._for(name)
        if delivery.state.pop(_STATE_KEY, False):
            series.in_flight.dec()
        self.duration.labels(name, outcome).observe(duration)
        if outcome == "handled":
            series.handled.inc()
        if failure is not None:
            series.failed.inc()
            if failure.kind == "timeout":
                series.timed_out.inc()

    def on_retry(self, delivery: Delivery, *, delay: float, failure: Failure) -> None:
        self._for(delivery.listener.__name__).retried.inc()

    def on_park(self, delivery: Delivery, *, reason: str, failure: Failure) -> None:
        self.parked.labels(delivery.listener.__name__, reason).inc()


class MultiprocessEndpoint:
    """The metrics of every worker of a supervisor, served on one port (see the module doc).

    The supervisor drives it: `open()` before anything imports prometheus_client (the CLI
    does that even before importing the application), `serve()` in the forked serving
    process, `release()` in each forked worker, `worker_died(pid)` for each worker reaped,
    `close()` at the end.
    """

    def __init__(self, port: int, host: str = "0.0.0.0") -> None:
        self.host = host
        self.port = port
        self.directory: str | None = None
        self._socket: socket.socket | None = None
        self._saved_env: str | None = None
        self._saved_value_class: Any = None

    @property
    def url(self) -> str:
        """Where the endpoint answers (the bound port, once open)."""
        return f"http://{self.host}:{self.port}/metrics"

    def open(self) -> None:
        """Bind the port, create the private directory and point prometheus_client at it.

        Idempotent. Raises:
            ConfigurationError: the port cannot be bound (in use, not permitted).
        """
        if self._socket is not None:
            return
        sock = bind_port(self.host, self.port, "metrics")
        self._socket = sock
        self.port = sock.getsockname()[1]
        self.directory = tempfile.mkdtemp(prefix="amqp-listener-metrics-")
        self._saved_env = os.environ.get(ENV_VAR)
        os.environ[ENV_VAR] = self.directory
        from prometheus_client import values  # only now that the variable is set

        if not getattr(values.ValueClass, "_multiprocess", False):
            # Imported before the variable was set: switch metrics created from now on.
            self._saved_value_class = values.ValueClass
            values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]
        atexit.register(self.close)  # also when the run never reaches the supervisor

    def release(self) -> None:
        """In a forked worker: close this process's copy of the listening socket."""
        if self._socket is not None:
            with contextlib.suppress(OSError):
                self._socket.close()
            self._socket = None

    def worker_died(self, pid: int) -> None:
        """Drop a dead worker's live gauges (its counters and histograms stay counted)."""
        if self.directory is None:
            return
        from prometheus_client import multiprocess

        try:
            multiprocess.mark_process_dead(pid, self.directory)  # type: ignore[no-untyped-call]
        except OSError as exc:
            log.warning("could not drop the metrics of worker pid=%d: %s", pid, exc)

    def serve(self) -> None:
        """In the serving process: answer scrapes until killed."""
        if self._socket is None or self.directory is None:
            raise RuntimeError("MultiprocessEndpoint.serve() before open()")
        from prometheus_client import CollectorRegistry
        from prometheus_client.exposition import MetricsHandler
        from prometheus_client.multiprocess import MultiProcessCollector

        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=self.directory)  # type: ignore[no-untyped-call]
        server = _Server(self._socket, MetricsHandler.factory(registry))
        server.serve_forever()

    def close(self) -> None:
        """Close the socket, remove the directory and restore the environment. Idempotent."""
        self.release()
        if self.directory is None:
            return
        shutil.rmtree(self.directory, ignore_errors=True)
        if os.environ.get(ENV_VAR) == self.directory:
            if self._saved_env is None:
                del os.environ[ENV_VAR]
            else:
                os.environ[ENV_VAR] = self._saved_env
        if self._saved_value_class is not None:
            from prometheus_client import values

            values.ValueClass = self._saved_value_class
            self._saved_value_class = None
        self.directory = None
        atexit.unregister(self.close)


class _Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    """An HTTP server on a socket that is already bound and listening (the supervisor's)."""

    daemon_threads = True

    def __init__(self, sock: socket.socket, handler: type[http.server.BaseHTTPRequestHandler]):
        socketserver.BaseServer.__init__(self, sock.getsockname()[:2], handler)
        self.socket = sock


def bind_port(host: str, port: int, purpose: str) -> socket.socket:
    """A listening socket for an endpoint, bound before any fork.

    Raises:
        ConfigurationError: the port cannot be bound (in use, not permitted).
    """
    try:
        return socket.create_server((host, port), backlog=64)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise ConfigurationError(
            f"cannot serve {purpose} on {host}:{port}: {reason.lower()}"
        ) from exc
