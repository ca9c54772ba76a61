"""Spans of this process kept in memory (OpenTelemetry's InMemorySpanExporter), for the tests of
the tracing code that runs in it (the servers under test export to `otlp_sink`, tests/conftest.py)."""

from __future__ import annotations

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

_EXPORTER = InMemorySpanExporter()


@pytest.fixture
def memory_spans() -> InMemorySpanExporter:
    """This process's spans, from an empty list. OpenTelemetry takes one provider per process: the
    first test to ask installs it, for the rest of the session."""
    if not isinstance(trace.get_tracer_provider(), TracerProvider):
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(_EXPORTER))
        trace.set_tracer_provider(provider)
    _EXPORTER.clear()
    return _EXPORTER
