"""Protobuf <-> service types. The only module that knows both shapes."""

from __future__ import annotations

from dataclasses import asdict

from google.protobuf.json_format import MessageToDict
from rollout_client.proto.rollout.v1 import rollout_pb2 as pb

from rollout_service.types import Completion, GenerateRequest, PushResult, Sample, ServerStatus, TopLogprobs
from rollout_service.weights.manifest import DeltaSpec, PushHeader, SharedBytes, TensorSpec

_FINISH = {
    None: pb.FINISH_REASON_UNSPECIFIED,  # a piece of a sample still running (stream_tokens)
    "stop": pb.FINISH_REASON_STOP,
    "length": pb.FINISH_REASON_LENGTH,
    "aborted": pb.FINISH_REASON_ABORTED,
}


def request_from_proto(msg: pb.GenerateRequest) -> GenerateRequest:
    """Validate a GenerateRequest message (same checks and messages as the HTTP JSON body)."""
    # Token ids go from the message's repeated field into an int32 array (types.TokenIds), never
    # through a list of Python ints.
    prompts = [{"text": p.text or None, "token_ids": p.token_ids or None} for p in msg.prompts]
    # Only fields the client set: unset optionals take the documented defaults.
    sampling = MessageToDict(msg.sampling, preserving_proto_field_name=True, always_print_fields_with_no_presence=False)
    for key in ("n", "max_tokens", "top_k", "logprobs", "prompt_logprobs", "seed"):
        if key in sampling:  # MessageToDict renders 64-bit ints as strings
            sampling[key] = int(sampling[key])
    return GenerateRequest.parse({
        "prompts": prompts, "sampling": sampling, "request_id": msg.request_id, "session_id": msg.session_id,
        "min_weight_version": msg.min_weight_version,
        "max_staleness": msg.max_staleness if msg.HasField("max_staleness") else None,
        "stream_tokens": msg.stream_tokens,
    })


def _top(items: list[TopLogprobs]) -> list[pb.TopLogprobs]:
    return [pb.TopLogprobs(token_ids=t.token_ids, logprobs=t.logprobs) for t in items]


def _sample(s: Sample) -> pb.Sample:
    return pb.Sample(
        token_ids=s.token_ids,
        text=s.text,
        logprobs=s.logprobs,
        top_logprobs=_top(s.top_logprobs),
        finish_reason=_FINISH[s.finish_reason],
        stop_reason=s.stop_reason,
        weight_version=s.weight_version,
        first_weight_version=s.first_weight_version,
        token_weight_versions=[pb.VersionRun(version=v, count=n) for v, n in s.token_weight_versions],
        index=s.index,
    )


def completion_to_proto(c: Completion) -> pb.Completion:
    return pb.Completion(
        prompt_index=c.prompt_index,
        prompt_token_ids=c.prompt_token_ids,
        samples=[_sample(s) for s in c.samples],
        prompt_logprobs=c.prompt_logprobs,
        prompt_top_logprobs=_top(c.prompt_top_logprobs),
        request_id=c.request_id,
        cached_prompt_tokens=c.cached_prompt_tokens,
    )


def status_to_proto(s: ServerStatus) -> pb.GetStatusResponse:
    fields = asdict(s)
    fields["counters"] = pb.Counters(**fields["counters"])
    fields["last_push"] = pb.PushWeightsResponse(**fields["last_push"]) if s.last_push else None
    return pb.GetStatusResponse(**fields)


def tensor_spec_from_proto(t: pb.TensorSpec) -> TensorSpec:
    crc32 = t.crc32 if t.HasField("crc32") else None
    delta = None
    if t.HasField("delta"):
        d = t.delta
        delta = DeltaSpec(codec=d.codec, base_crc32=d.base_crc32, changed=d.changed, wire_nbytes=d.wire_nbytes)
    shared = SharedBytes(file=t.shared.file, offset=t.shared.offset) if t.HasField("shared") else None
    return TensorSpec(name=t.name, dtype=t.dtype, shape=tuple(t.shape), nbytes=t.nbytes, crc32=crc32, delta=delta, shared=shared)


def push_header_from_proto(msg: pb.PushHeader) -> PushHeader:
    tensors = tuple(tensor_spec_from_proto(t) for t in msg.tensors)
    expected = msg.expected_version if msg.HasField("expected_version") else None
    base = msg.delta_base_version if msg.HasField("delta_base_version") else None
    return PushHeader(tensors=tensors, expected_version=expected, label=msg.label, inflight=msg.inflight, delta_base_version=base)


def push_result_to_proto(r: PushResult) -> pb.PushWeightsResponse:
    return pb.PushWeightsResponse(**asdict(r))
