"""What the traced-server tests check on either backend: a Generate and a push, made with a request
id and a caller's trace context, as the spans the server sent to the OTLP receiver
(otlp_sink.py), the ids in its replies, and its JSON log lines."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable
from pathlib import Path

import grpc
import httpx
from rollout_client.proto.rollout.v1 import rollout_pb2 as pb
from rollout_client.proto.rollout.v1 import rollout_pb2_grpc as pb_grpc
from safetensors.torch import load_file, save

from tests.observability.otlp_sink import OtlpSink

GENERATE_SPANS = {"rollout.v1.RolloutService/Generate", "replica.generate", "engine.generate"}
PUSH_SPANS = {"POST /v1/weights", "push.receive", "push.prepare", "push.commit", "push.apply", "replica.prepare", "replica.apply"}


def caller_context() -> tuple[str, str, str]:
    """(trace id, span id, traceparent) of a caller's span."""
    trace_id, span_id = uuid.uuid4().hex, uuid.uuid4().hex[:16]
    return trace_id, span_id, f"00-{trace_id}-{span_id}-01"


def generate_in_callers_trace(sink: OtlpSink, channel: grpc.Channel, metadata: tuple = ()) -> None:
    """A Generate sent with x-request-id and traceparent (and `metadata`: a key) on `channel`: the
    id comes back in the initial metadata, and the ingress, replica and engine spans form one chain
    under the caller's span."""
    trace_id, span_id, traceparent = caller_context()
    request_id = f"gen-{uuid.uuid4().hex[:8]}"
    request = pb.GenerateRequest(prompts=[pb.Prompt(token_ids=[11, 12, 13])], sampling=pb.SamplingParams(max_tokens=4, n=2))
    reply, call = pb_grpc.RolloutServiceStub(channel).Generate.with_call(
        request, metadata=(("x-request-id", request_id), ("traceparent", traceparent), *metadata), timeout=120,
    )
    assert dict(call.initial_metadata())["x-request-id"] == request_id
    spans = sink.wait_for(GENERATE_SPANS, lambda s: s.trace_id == trace_id)
    ingress, replica, engine = (spans[n] for n in ("rollout.v1.RolloutService/Generate", "replica.generate", "engine.generate"))
    assert ingress.parent_id == span_id and replica.parent_id == ingress.span_id and engine.parent_id == replica.span_id
    assert ingress.request_id == replica.request_id == request_id and ingress.attributes["rpc.grpc.status_code"] == 0
    assert replica.attributes["rollout.prompts"] == 1 and replica.attributes["rollout.replica_id"]
    assert engine.attributes["rollout.samples"] == 2
    assert engine.attributes["rollout.completion_tokens"] == sum(len(s.token_ids) for s in reply.completions[0].samples) == 8
    assert not any(s.error for s in spans.values())


def refused_generate_has_its_id(channel: grpc.Channel, http: httpx.Client, metadata: tuple = ()) -> None:
    """A refused call returns its id too: gRPC in the initial metadata, HTTP in a header."""
    request_id = f"bad-{uuid.uuid4().hex[:8]}"
    call = pb_grpc.RolloutServiceStub(channel).Generate.future(
        pb.GenerateRequest(), metadata=(("x-request-id", request_id), *metadata), timeout=60,
    )
    assert call.exception().code() is grpc.StatusCode.INVALID_ARGUMENT
    assert dict(call.initial_metadata())["x-request-id"] == request_id
    reply = http.post("/v1/generate", json={"prompts": []}, headers={"x-request-id": request_id})
    assert reply.status_code == 400 and reply.headers["x-request-id"] == request_id


def push_in_callers_trace(sink: OtlpSink, http: httpx.Client, model: Path) -> str:
    """An HTTP push of one tensor with x-request-id and traceparent: the id comes back, and every
    phase's span (the ingress's and each replica's) is in the caller's trace. Returns the id."""
    trace_id, span_id, traceparent = caller_context()
    request_id = f"push-{uuid.uuid4().hex[:8]}"
    name, tensor = next(iter(load_file(model / "model.safetensors").items()))
    reply = http.post(
        "/v1/weights", content=save({name: tensor * 1.01}), timeout=120,
        headers={"x-request-id": request_id, "traceparent": traceparent},
    )
    assert reply.status_code == 200, reply.text
    assert reply.headers["x-request-id"] == request_id
    spans = sink.wait_for(PUSH_SPANS, lambda s: s.trace_id == trace_id)
    ingress = spans["POST /v1/weights"]
    assert ingress.parent_id == span_id and ingress.request_id == request_id
    version = reply.json()["version"]
    for phase in ("push.receive", "push.prepare", "push.commit", "push.apply"):
        assert spans[phase].parent_id == ingress.span_id and spans[phase].attributes["rollout.version"] == version, phase
    assert spans["push.receive"].attributes["rollout.bytes"] == tensor.numel() * tensor.element_size()
    assert spans["replica.prepare"].parent_id == spans["push.prepare"].span_id
    assert spans["replica.apply"].parent_id == spans["push.apply"].span_id
    assert spans["replica.apply"].request_id == request_id and spans["replica.apply"].attributes["rollout.version"] == version
    assert not any(s.error for s in spans.values())
    return request_id


def json_lines_with(request_id: str, lines: Iterable[str]) -> list[dict]:
    """The JSON log records among `lines` (other text around them is skipped) of `request_id`."""
    found = []
    for line in lines:
        start = line.find("{")
        if request_id not in line or start < 0:
            continue
        try:
            record = json.loads(line[start:])
        except ValueError:
            continue
        if record.get("request_id") == request_id:
            found.append(record)
    return found
