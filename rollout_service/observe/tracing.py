"""OpenTelemetry traces: off unless an OTLP endpoint is configured, then sent over OTLP/gRPC in
batches (a BatchSpanProcessor: spans are queued and exported off the serving path).

Each process that serves (the single-process server; under Ray Serve the ingress and every engine
replica) calls `setup(config)` once. The endpoint is `config.otlp_endpoint`, else the standard
OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT, read by the exporter as the SDK documents it (so are
OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES, OTEL_BSP_*, OTEL_PROPAGATORS; OTEL_SDK_DISABLED=true
turns tracing off). Without one no provider is installed and every span below is the API's no-op
span: starting one costs a function call, and nothing is recorded or sent.

Spans are never attached as OpenTelemetry's current context: a call's span travels in its
`calls.Call` (the parent of the spans below it, by default), and to a replica, which under Ray
Serve is another process, in a small carrier (`carrier()`: the request id and the W3C trace
context) that the replica turns back into the call (`continued`). Attributes given as keywords are
named `rollout.<keyword>`; every span made in a call carries its `rollout.request_id`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Iterator, Mapping
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import Span, Status, StatusCode

from rollout_service.observe import calls

log = logging.getLogger(__name__)

REQUEST_ID = "x-request-id"  # the request id's header, gRPC metadata key and carrier key
SERVICE_NAME = "rollout-service"  # where OTEL_SERVICE_NAME does not name it
_ENDPOINT_ENV = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")

# A proxy: the no-op tracer until `setup` installs a provider, the provider's after.
_tracer = trace.get_tracer("rollout_service")


def endpoint(config) -> str | None:
    """Where spans go: config.otlp_endpoint, else the standard environment; None: tracing is off."""
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    return config.otlp_endpoint or next((os.environ[n] for n in _ENDPOINT_ENV if os.environ.get(n)), None)


def setup(config) -> bool:
    """Install the OTLP exporter in this process if an endpoint is configured; True if it did.
    Once per process: OpenTelemetry keeps the first provider installed."""
    where = endpoint(config)
    if where is None:
        return False
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    name = {} if os.environ.get("OTEL_SERVICE_NAME") else {"service.name": SERVICE_NAME}
    provider = TracerProvider(resource=Resource.create(name))
    # Given the config's endpoint explicitly; else the exporter reads the environment's itself.
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=config.otlp_endpoint)))
    trace.set_tracer_provider(provider)
    log.info("sending traces to %s (OTLP/gRPC)", where)
    return True


def _attributes(attrs: Mapping[str, Any]) -> dict[str, Any]:
    return {f"rollout.{k}": v for k, v in attrs.items() if v is not None}


def parent() -> otel_context.Context | None:
    """The current call's span context; None outside a call (OpenTelemetry's current, a new trace)."""
    call = calls.current()
    return call.trace if call is not None else None  # type: ignore[return-value]


def start(name: str, parent_context: otel_context.Context | None = None, **attrs: Any) -> Span:
    """A started span under `parent_context` (default: the current call's span), not made current;
    end it with `end` or `ended`. It carries the current call's request id, to find it by."""
    context = parent_context if parent_context is not None else parent()
    call = calls.current()
    if call is not None:
        attrs.setdefault("request_id", call.request_id)
    return _tracer.start_span(name, context=context, attributes=_attributes(attrs))


def note(span: Span, **attrs: Any) -> None:
    """Add attributes learnt while the span runs (tokens made, bytes received)."""
    if span.is_recording():
        span.set_attributes(_attributes(attrs))


def end(span: Span | None, error: BaseException | None = None) -> None:
    """End `span` (once; None and an ended span are left alone), recording `error` if given (a
    cancellation is noted, not recorded as an error)."""
    if span is None or not span.is_recording():
        return
    if isinstance(error, (GeneratorExit, asyncio.CancelledError)):  # the caller went away: not a failure
        span.set_attribute("rollout.cancelled", True)
    elif error is not None:
        span.record_exception(error)
        span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))
    span.end()


@contextlib.contextmanager
def ended(span: Span) -> Iterator[Span]:
    """`span`, ended when the block is left, with the exception that left it recorded."""
    try:
        yield span
    except BaseException as exc:
        end(span, exc)
        raise
    end(span)


def span(name: str, parent_context: otel_context.Context | None = None, **attrs: Any):
    """A span around a block: `with tracing.span("push.prepare", version=7) as s: ...`."""
    return ended(start(name, parent_context, **attrs))


def within(span: Span) -> otel_context.Context:
    """A context whose span is `span`: the parent to give the spans under it."""
    return trace.set_span_in_context(span)


def extract(headers: Mapping[str, str]) -> otel_context.Context:
    """The caller's trace context in W3C `traceparent` / `tracestate` headers or gRPC metadata
    (lower-case keys); an empty context (a new trace) without one."""
    return propagate.extract(headers, context=otel_context.Context())


def carrier(under: otel_context.Context | None = None) -> dict[str, str]:
    """The current call's request id and trace context (`under`, else the call's span), passed to
    a replica with each call to it."""
    call = calls.current()
    if call is None:
        return {}
    out = {REQUEST_ID: call.request_id}
    context = under if under is not None else call.trace
    if context is not None:
        propagate.inject(out, context=context)  # type: ignore[arg-type]
    return out


@contextlib.contextmanager
def continued(carried: Mapping[str, str] | None, route: str) -> Iterator[otel_context.Context | None]:
    """In a replica: the call `carried` came from, current in the block (for its log lines) where
    no call is (a Serve replica's own process; the single-process server's replica runs inside the
    ingress's call already); yields the parent context for the replica's spans."""
    if not carried:
        yield parent()
        return
    context = extract(carried)
    if calls.current() is not None:
        yield context
        return
    with calls.serving(calls.Call(calls.request_id(carried.get(REQUEST_ID)), route, context)):
        yield context
