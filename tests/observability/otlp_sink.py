"""A real OTLP/gRPC trace receiver on a free loopback port: what a collector would be for the
servers under test, which export to it with their production exporter (--otlp-endpoint). It keeps
every span it receives, from every process (the single-process server; Serve's ingress and
replicas), for the tests to read."""

from __future__ import annotations

import threading
import time
from concurrent import futures
from dataclasses import dataclass

import grpc
from opentelemetry.proto.collector.trace.v1 import (
    trace_service_pb2,
    trace_service_pb2_grpc,
)


@dataclass(frozen=True)
class ReceivedSpan:
    name: str
    trace_id: str
    span_id: str
    parent_id: str  # "" for a root span
    attributes: dict
    service: str  # the resource's service.name
    error: bool

    @property
    def request_id(self) -> str | None:
        return self.attributes.get("rollout.request_id")


def _value(v):
    return getattr(v, v.WhichOneof("value")) if v.WhichOneof("value") else None


class _Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, sink: OtlpSink):
        self.sink = sink

    def Export(self, request, context):
        for resource_spans in request.resource_spans:
            resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
            for scope in resource_spans.scope_spans:
                for s in scope.spans:
                    self.sink.add(ReceivedSpan(
                        s.name, s.trace_id.hex(), s.span_id.hex(), s.parent_span_id.hex(),
                        {a.key: _value(a.value) for a in s.attributes}, resource.get("service.name", ""),
                        s.status.code == 2,  # STATUS_CODE_ERROR
                    ))
        return trace_service_pb2.ExportTraceServiceResponse()


class OtlpSink:
    def __init__(self):
        self._spans: list[ReceivedSpan] = []
        self._lock = threading.Lock()
        self._server = grpc.server(futures.ThreadPoolExecutor(4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_Receiver(self), self._server)
        port = self._server.add_insecure_port("127.0.0.1:0")
        self._server.start()
        self.endpoint = f"http://127.0.0.1:{port}"

    def add(self, span: ReceivedSpan) -> None:
        with self._lock:
            self._spans.append(span)

    def spans(self) -> list[ReceivedSpan]:
        with self._lock:
            return list(self._spans)

    def wait_for(self, names: set[str], where=lambda s: True, timeout: float = 30.0) -> dict[str, ReceivedSpan]:
        """The first span received of each name in `names` for which `where` holds, once all came."""
        deadline = time.monotonic() + timeout
        while True:
            found = {}
            for s in self.spans():
                if s.name in names and s.name not in found and where(s):
                    found[s.name] = s
            if found.keys() == names:
                return found
            if time.monotonic() > deadline:
                seen = sorted({s.name for s in self.spans()})
                raise AssertionError(f"spans {sorted(names - found.keys())} not received in {timeout} s; received: {seen}")
            time.sleep(0.1)

    def stop(self) -> None:
        self._server.stop(0)
