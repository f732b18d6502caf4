"""The supervisor's serving processes: the metrics and health endpoints.

Each endpoint is answered by a small process of its own, forked and supervised like a worker
(restarted with back-off if it dies, killed at the end), never by a thread in the
supervisor: forking is only safe from a process that runs no other thread. Kept apart from
the supervision loop because these processes hold no broker connection and take part in no
drain or reload roll: they are started, reaped and killed by these few rules alone.

- **Metrics** (`--metrics-port`): the workers count into prometheus_client's multiprocess
  files, and the serving process answers scrapes with the sum of all workers. See
  `listener.metrics` for why, and for the order in which the pieces are set up.
- **Health** (`--health-port`, `Settings.health_port`): `/livez` and `/readyz`, answered from
  the state the supervisor writes to the serving process (`health_state`); see
  `listener.runner.health`. A worker is ready while it consumes on every listener; the
  supervisor is ready while each of its N worker places has a ready worker. Its socket and
  serving process are handed over across a reload's re-exec and keep answering.
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from listener.errors import ConfigurationError
from listener.runner import children
from listener.runner.child import REAP_WAIT, ChildProcess
from listener.runner.health import LIVE_PATH, READY_PATH, HealthEndpoint
from listener.runner.restarts import describe

if TYPE_CHECKING:
    from listener.metrics import MultiprocessEndpoint
    from listener.settings import Settings

__all__ = ["Endpoints", "Service", "health_state"]

log = logging.getLogger("listener.supervisor")


@dataclass
class Service:
    """A serving process of the supervisor (metrics, health): what it serves, where, and how."""

    name: str
    url: str
    serve: Callable[[], None]
    process: ChildProcess = field(default_factory=lambda: ChildProcess(0))
    #: Seconds a SIGTERM gets to end it before the SIGKILL (0: SIGKILL at once).
    stop_wait: float = 0.0


class Endpoints:
    """The supervisor's metrics and health endpoints, and the processes that serve them.

    The supervisor drives it: `open()` before the broker check (a port in use fails there),
    `start_metrics()` once the workers may start, `publish()` on each change and tick,
    `reap()` and `restart()` on each wake-up, `release()` in every forked worker, `kill()` and
    `close()` at the end, `before_exec()` and `after_failed_exec()` around a reload's
    re-exec. `state()` is the health document of the moment (`health_state`);
    `close_in_child()` closes, in a forked serving process, what belongs to the supervisor
    and its workers.
    """

    def __init__(
        self,
        metrics: MultiprocessEndpoint | None,
        health_port: int | None,
        *,
        supervisor: int,
        heartbeat: float,
        state: Callable[[], dict[str, Any]],
        close_in_child: Callable[[], None],
        settings: Settings | None = None,
    ) -> None:
        self.metrics = metrics
        self.health: HealthEndpoint | None = None
        self.mask: set[int | signal.Signals] = set()
        self._health_port = health_port
        self._supervisor = supervisor
        self._heartbeat = heartbeat
        self._state = state
        self._close_in_child = close_in_child
        self._metrics_service: Service | None = None
        self._health_service: Service | None = None
        self._health_sent = ""
        self._health_at = 0.0
        self._relay_service: Service | None = None
        if settings is not None and settings.outbox_relay:
            self._relay_service = _relay_service(settings)

    def open(self, mask: set[int | signal.Signals], handoff: Mapping[str, Any] | None) -> None:
        """Bind the ports (or take over the health endpoint a reload handed down); fork the
        health server.

        Raises:
            ConfigurationError: a port cannot be bound.
        """
        self.mask = mask
        if self.metrics is not None:
            self.metrics.open()  # a port in use fails here, before the broker is touched
            self._metrics_service = Service(
                "metrics endpoint", self.metrics.url, self.metrics.serve
            )
        self._open_health(handoff)

    def _open_health(self, handoff: Mapping[str, Any] | None) -> None:
        port = self._health_port
        inherited = (handoff or {}).get("health")
        if inherited is not None:
            endpoint = HealthEndpoint.adopt(inherited["endpoint"])
            service = _health_service_for(endpoint, ChildProcess.adopt(0, inherited.get("server")))
            if port is not None and port in (0, endpoint.port):
                self.health, self._health_service = endpoint, service
                self.publish(force=True)
                return
            _kill(service)  # the new command line has no (or another) port
            endpoint.close()
        if port is None:
            return
        self.health = HealthEndpoint(port)
        self.health.open()  # ConfigurationError: the CLI's one line, exit 2
        self._health_service = _health_service_for(self.health)
        # Before the broker check: /livez answers (and /readyz says no) while it waits.
        self._spawn(self._health_service)

    def start_metrics(self) -> None:
        """Fork the metrics server and the outbox relay (the workers may start)."""
        for service in (self._metrics_service, self._relay_service):
            if service is not None:
                self._spawn(service)

    def services(self) -> list[Service]:
        """The serving processes there are (running, or waiting to restart)."""
        services = (self._metrics_service, self._health_service, self._relay_service)
        return [s for s in services if s is not None]

    def publish(self, *, force: bool = False) -> None:
        """Tell the health endpoint the state: on a change, and at least once per tick."""
        if self.health is None:
            return
        state = self._state()
        text = json.dumps(state, sort_keys=True)
        now = time.monotonic()
        if force or text != self._health_sent or now - self._health_at >= self._heartbeat:
            self.health.publish(state)
            self._health_sent, self._health_at = text, now

    def processes(self) -> list[ChildProcess]:
        """The processes of the serving processes there are."""
        return [service.process for service in self.services()]

    def restart(self) -> None:
        """Start again the serving processes whose back-off is over."""
        now = time.monotonic()
        for service in self.services():
            if service.process.due(now):
                self._spawn(service)

    def reap(self, *, stopping: bool) -> None:
        """Reap the serving processes that ended; unless stopping, schedule their restart."""
        for service in self.services():
            _reap(service, stopping=stopping)

    def kill(self) -> None:
        """SIGKILL every serving process (they hold nothing to save)."""
        for service in self.services():
            _kill(service)

    def release(self, keep: Service | None = None) -> None:
        """In a forked process: close the endpoints' sockets and pipes, but `keep`'s."""
        if self.metrics is not None and (keep is None or keep is not self._metrics_service):
            self.metrics.release()
        if self.health is not None and (keep is None or keep is not self._health_service):
            self.health.release()

    def close(self) -> None:
        """Close both endpoints (the supervisor, at the end)."""
        if self.metrics is not None:
            self.metrics.close()
        if self.health is not None:
            self.health.close()

    def before_exec(self) -> dict[str, Any] | None:
        """Before a reload's re-exec: stop serving metrics (the new image binds the port
        again); what the new image needs to keep the health probes answering."""
        if self._metrics_service is not None:
            _kill(self._metrics_service)  # the new image binds the port again
        if self._relay_service is not None:
            _kill(self._relay_service)  # the new image starts its own
        if self.metrics is not None:
            self.metrics.close()
        if self.health is not None and self._health_service is not None:
            return {"endpoint": self.health.handoff(), "server": self._health_service.process.pid}
        return None

    def after_failed_exec(self) -> None:
        """The re-exec failed: serve metrics again (nothing else was stopped)."""
        if self.metrics is not None and self._metrics_service is not None:
            with contextlib.suppress(ConfigurationError):
                self.metrics.open()
                self._spawn(self._metrics_service)

    def _spawn(self, service: Service) -> None:
        started = _start(
            service,
            supervisor=self._supervisor,
            mask=self.mask,
            close_in_child=lambda: self._in_child(service),
        )
        if started and service is self._health_service:
            self.publish(force=True)

    def _in_child(self, service: Service) -> None:
        self._close_in_child()
        self.release(keep=service)


def _health_service_for(endpoint: HealthEndpoint, process: ChildProcess | None = None) -> Service:
    """The serving process of an open health endpoint (`process`: one a reload handed down)."""
    url = f"{endpoint.url}{LIVE_PATH} and {READY_PATH}"
    if process is None:
        return Service("health endpoint", url, endpoint.serve)
    return Service("health endpoint", url, endpoint.serve, process)


def _start(
    service: Service,
    *,
    supervisor: int,
    mask: set[int | signal.Signals],
    close_in_child: Callable[[], None],
) -> bool:
    """Fork the process that serves `service` (see `listener.metrics`); whether it started.

    A fork that fails schedules a new try with back-off.
    """
    server = service.process

    def child() -> int:
        close_in_child()
        return children.run_service(service.name, service.serve, supervisor=supervisor, mask=mask)

    first = server.spawns == 0
    try:
        pid = server.spawn(child)
    except OSError as exc:
        wait = server.back_off(lived=0.0)
        log.error("could not start the %s (%s); trying again in %.1fs", service.name, exc, wait)
        return False
    log.log(
        logging.INFO if first else logging.DEBUG,
        "%s pid=%d serving %s",
        service.name,
        pid,
        service.url,
    )
    return True


def _reap(service: Service, *, stopping: bool) -> None:
    """Reap the serving process if it ended; unless stopping, schedule its restart."""
    server = service.process
    ended = server.reap()
    if ended is None or stopping:
        return
    wait = server.back_off(ended.lived)
    log.warning(
        "%s pid=%d died: %s after %.1fs; restarting in %.1fs",
        service.name,
        ended.pid,
        describe(ended.status),
        ended.lived,
        wait,
    )


def _relay_service(settings: Settings) -> Service:
    """The outbox relay (`run --outbox`): stopped by SIGTERM, which lets it settle its batch."""

    def serve() -> None:
        from listener._cli_outbox import serve_relay

        serve_relay(settings)

    where = settings.redacted_database_url or "no database"
    return Service("outbox relay", f"the outbox of {where}", serve, stop_wait=REAP_WAIT)


def _kill(service: Service) -> None:
    """End a serving process and reap it (bounded): SIGKILL, as most hold nothing to save, or
    first SIGTERM for one that does (the relay finishes its batch)."""
    server = service.process
    pid = server.pid
    if not server.stop(service.stop_wait):
        log.error("%s pid=%d did not die after SIGKILL", service.name, pid)


def health_state(
    slots: Sequence[ChildProcess],
    old: Mapping[int, ChildProcess],
    *,
    paused: bool,
    reloading: bool,
    stopping: bool,
    up: bool,
) -> dict[str, Any]:
    """What the health endpoint answers: a place counts as ready when its worker is, or, while
    a reload has yet to replace it, when the old worker in it is."""
    n = len(slots)
    serving: list[ChildProcess] = []
    for slot in slots:
        previous = old.get(slot.number)
        if slot.pid is not None and slot.started:
            serving.append(slot)
        elif previous is not None and previous.pid is not None:
            serving.append(previous)
    ready = sum(1 for slot in serving if slot.ready)
    paused = paused or any(slot.state == "paused" for slot in serving)
    if stopping:
        detail = "stopping"
    elif not up and not any(slot.pid for slot in slots):
        detail = "starting: checking the broker"
    else:
        detail = f"{ready} of {n} worker(s) consuming"
        if paused:
            detail += "; paused"
        if reloading:
            detail += "; reloading"
    return {
        "live": not stopping,
        "ready": not stopping and ready == n,
        "workers": n,
        "ready_workers": ready,
        "paused": paused,
        "stopping": stopping,
        "reloading": reloading,
        "detail": detail,
    }
