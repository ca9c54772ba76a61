"""Fuzzing the request checks without an engine (hypothesis): a GenerateRequest drawn from the proto's
own descriptors (so a new field is fuzzed as soon as it exists) is either a valid request or an
InvalidArgument naming a field; never another exception. `make soak` runs many more cases."""

from __future__ import annotations

import os

import pytest
from google.protobuf.descriptor import FieldDescriptor
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rollout_client.proto.rollout.v1 import rollout_pb2 as pb

from rollout_service.api.messages import request_from_proto
from rollout_service.api.limits import check_generate
from rollout_service.config import ServerConfig
from rollout_service.errors import InvalidArgument

# Per-test deadlines off: a loaded CI machine must not turn slowness into a failure.
CASES = settings(
    max_examples=int(os.environ.get("FUZZ_EXAMPLES", "200")), deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

_INTS = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
}


def _scalar(field: FieldDescriptor):
    if field.type in _INTS:
        low, high = _INTS[field.type]
        edge = st.sampled_from([low, high, -1, 0, 1, 2, 255, 256, 1000, 10**6])
        return st.one_of(edge.filter(lambda v: low <= v <= high), st.integers(low, high))
    if field.type in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE):
        width = 32 if field.type == FieldDescriptor.TYPE_FLOAT else 64
        return st.one_of(st.sampled_from([0.0, -0.0, 1.0, -1.0, 1e-9, 1e9]), st.floats(width=width))
    if field.type == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if field.type == FieldDescriptor.TYPE_STRING:
        return st.text(max_size=20)
    if field.type == FieldDescriptor.TYPE_ENUM:
        return st.sampled_from([v.number for v in field.enum_type.values])
    raise NotImplementedError(field.type)


def messages(descriptor, depth: int = 0):
    """Messages of `descriptor` with a random subset of fields set to random (often edge) values."""
    fields = {}
    for field in descriptor.fields:
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            key, value = field.message_type.fields_by_name["key"], field.message_type.fields_by_name["value"]
            strategy = st.dictionaries(_scalar(key), _scalar(value), max_size=4)
        elif field.message_type is not None:
            if depth > 2:
                continue
            inner = messages(field.message_type, depth + 1)
            strategy = st.lists(inner, max_size=5) if field.is_repeated else inner
        elif field.is_repeated:
            strategy = st.lists(_scalar(field), max_size=6)
        else:
            strategy = _scalar(field)
        fields[field.name] = st.none() | strategy

    @st.composite
    def build(draw):
        values = {name: draw(s) for name, s in fields.items()}
        return descriptor._concrete_class(**{k: v for k, v in values.items() if v is not None})

    return build()


@pytest.mark.reliability("fuzz")
@given(messages(pb.GenerateRequest.DESCRIPTOR))
@CASES
def test_any_generate_request_is_valid_or_invalid_argument_naming_a_field(tiny_model, cases, request_message):
    """GenerateRequest messages drawn from the proto's descriptors (random subsets of fields, edge
    values) through the request checks: each is valid or an InvalidArgument naming a field."""
    config = ServerConfig(model=tiny_model, max_model_len=256, max_prompts_per_call=4)
    try:
        req = request_from_proto(request_message)
        check_generate(req, config)
        cases["valid"] += 1
    except InvalidArgument as exc:
        assert exc.field and str(exc).startswith(exc.field)
        cases["INVALID_ARGUMENT"] += 1
