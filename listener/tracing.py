"""OpenTelemetry tracing: one trace from `notify()` to `handle()`.

Optional: install the extra (`pip install amqp-listener[otel]`) and configure a tracer
provider as usual. Then every message the framework publishes carries the current trace
context in its headers (W3C `traceparent`/`tracestate`, through the globally configured
propagator), retries and parked copies keep it, and the runner opens a CONSUMER span
around each attempt, child of the publisher's span, in which `handle()` runs (sync handlers
too: their thread gets the attempt's context). Without OpenTelemetry installed, everything
here does nothing.

    from listener.tracing import Tracing
    listener.add_middleware(Tracing())   # in a module the runner imports
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from listener.middleware import Delivery, Middleware

if TYPE_CHECKING:
    from listener.outcome import Failure

try:  # an optional dependency
    from opentelemetry import context as otel_context
    from opentelemetry import propagate, trace
except ImportError:  # pragma: no cover - exercised only without the extra
    otel_context = None  # type: ignore[assignment]
    propagate = None  # type: ignore[assignment]
    trace = None  # type: ignore[assignment]

__all__ = ["Tracing", "inject_trace_context"]

_STATE = "tracing.span"
_TOKEN = "tracing.token"


def inject_trace_context(headers: dict[str, Any] | None) -> dict[str, Any] | None:
    """`headers` plus the current trace context, when OpenTelemetry is installed and a span
    is active; otherwise `headers` unchanged."""
    if propagate is None or trace is None:
        return headers
    if not trace.get_current_span().get_span_context().is_valid:
        return headers
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    if not carrier:
        return headers
    return {**(headers or {}), **carrier}


class Tracing(Middleware):
    """Opens a CONSUMER span per attempt, continuing the publisher's trace."""

    def __init__(self, tracer_provider: Any = None) -> None:
        if trace is None:
            raise RuntimeError(
                "listener.tracing needs OpenTelemetry: pip install 'amqp-listener[otel]'"
            )
        self._tracer = trace.get_tracer("amqp-listener", tracer_provider=tracer_provider)

    def before_handle(self, delivery: Delivery) -> None:
        carrier = {k: v for k, v in delivery.headers.items() if isinstance(v, str)}
        parent = propagate.extract(carrier)
        span = self._tracer.start_span(
            f"{delivery.listener.queue} process",
            context=parent,
            kind=trace.SpanKind.CONSUMER,
            attributes={
                "messaging.system": "rabbitmq",
                "messaging.operation": "process",
                "messaging.destination.name": delivery.exchange or delivery.listener.queue,
                "messaging.rabbitmq.destination.routing_key": delivery.routing_key,
                "messaging.message.id": delivery.message_id,
                "amqp_listener.listener": delivery.listener.name(),
                "amqp_listener.attempt": delivery.attempt,
            },
        )
        delivery.state[_STATE] = span
        # Attached in the delivery's task: handle() runs in it (or in a thread that copies
        # its context), so spans it opens are children of this one.
        delivery.state[_TOKEN] = otel_context.attach(trace.set_span_in_context(span))

    def after_handle(
        self, delivery: Delivery, *, outcome: str, failure: Failure | None, duration: float
    ) -> None:
        span = delivery.state.pop(_STATE, None)
        token = delivery.state.pop(_TOKEN, None)
        if span is None:
            return
        span.set_attribute("amqp_listener.outcome", outcome)
        if failure is not None:
            span.set_attribute("amqp_listener.exception_type", failure.exception_type)
            span.set_status(trace.Status(trace.StatusCode.ERROR, failure.message[:200]))
        span.end()
        if token is not None:
            otel_context.detach(token)
