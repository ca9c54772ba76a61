"""Request validation shared by gRPC and HTTP: field paths and values in every message."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rollout_service.errors import InvalidArgument
from rollout_service.types import GenerateRequest, field_path


def _parse(**sampling):
    return GenerateRequest.parse({"prompts": [{"text": "x"}], "sampling": sampling})


def test_defaults_match_the_proto_comments():
    s = _parse().sampling
    assert (s.n, s.max_tokens, s.temperature, s.top_p, s.top_k, s.min_p) == (1, 16, 1.0, 1.0, 0, 0.0)
    assert s.logprobs == 0 and s.prompt_logprobs is None and s.seed is None and not s.ignore_eos


@pytest.mark.parametrize(
    "sampling, field, value",
    [
        ({"temperature": -1}, "sampling.temperature", "-1"),
        ({"top_p": 0}, "sampling.top_p", "0"),
        ({"top_p": 1.01}, "sampling.top_p", "1.01"),
        ({"max_tokens": 0}, "sampling.max_tokens", "0"),
        ({"min_p": 2}, "sampling.min_p", "2"),
        ({"n": 0}, "sampling.n", "0"),
        ({"top_k": -3}, "sampling.top_k", "-3"),
        ({"n": 2, "temperature": 0}, "sampling.n", "n=2"),
        ({"min_tokens": 20, "max_tokens": 10}, "sampling.min_tokens", "max_tokens=10"),
        ({"repetition_penalty": 0}, "sampling.repetition_penalty", "0"),
        ({"presence_penalty": 2.5}, "sampling.presence_penalty", "2.5"),
        ({"frequency_penalty": -3}, "sampling.frequency_penalty", "-3"),
        ({"logit_bias": {"7": 250.0}}, "sampling.logit_bias[7]", "250"),
        ({"logit_bias": {"seven": 1.0}}, "sampling.logit_bias[seven]", "seven"),
        ({"logit_bias": {"-5": 500.0}}, "sampling.logit_bias[-5]", "500"),
    ],
)
def test_out_of_range_sampling_names_field_and_value(sampling, field, value):
    with pytest.raises(InvalidArgument) as info:
        _parse(**sampling)
    assert info.value.field == field
    assert value in str(info.value)


def test_prompt_needs_exactly_one_of_text_and_token_ids():
    for prompt in ({}, {"text": "a", "token_ids": [1]}, {"text": ""}, {"token_ids": []}):
        with pytest.raises(InvalidArgument, match="exactly one") as info:
            GenerateRequest.parse({"prompts": [{"text": "fine"}, prompt]})
        assert info.value.field == "prompts[1]"


def test_empty_batch_and_unknown_fields_are_rejected():
    with pytest.raises(InvalidArgument) as info:
        GenerateRequest.parse({"prompts": []})
    assert info.value.field == "prompts"
    with pytest.raises(InvalidArgument) as info:
        GenerateRequest.parse({"prompts": [{"text": "x"}], "sampling": {"temprature": 1}})
    assert info.value.field == "sampling.temprature"


@given(st.lists(st.one_of(st.integers(0, 99), st.sampled_from(["a", "b_c"])), max_size=5))
def test_field_path_renders_indices_in_brackets(loc):
    path = field_path(tuple(loc))
    assert path.count("[") == sum(isinstance(p, int) for p in loc)
    for part in loc:
        assert (f"[{part}]" if isinstance(part, int) else part) in path


def test_max_staleness_becomes_a_minimum_version_against_the_newest_committed():
    req = GenerateRequest.parse({"prompts": [{"text": "x"}], "max_staleness": 2, "min_weight_version": 1})
    assert req.at_least(lambda: 10).min_weight_version == 8
    assert req.at_least(lambda: 2).min_weight_version == 1  # never below what the call asked for
    plain = GenerateRequest.parse({"prompts": [{"text": "x"}]})
    assert plain.at_least(lambda: 1 / 0) is plain  # no staleness bound: the version is not even read


def test_the_runner_limits_are_vllm_s_own():
    """The bounds on list lengths are the GPU runner's array sizes (read here, where the suite has
    vLLM; the API layer does not import it): a vLLM that changes them fails this test."""
    from vllm.v1.worker.gpu.sample import logit_bias

    from rollout_service import types

    assert types.MAX_ALLOWED_TOKEN_IDS == logit_bias.MAX_NUM_ALLOWED_TOKEN_IDS
    assert types.MAX_LOGIT_BIAS_TOKENS == logit_bias.MAX_NUM_LOGIT_BIAS_TOKENS
    assert types.MAX_STOP_TOKEN_IDS_WITH_MIN_TOKENS == logit_bias.MAX_NUM_STOP_TOKEN_IDS


@pytest.mark.parametrize(
    "sampling, field, text",
    [
        ({"allowed_token_ids": list(range(1025))}, "sampling.allowed_token_ids", "at most 1024"),
        ({"logit_bias": {str(i): 1.0 for i in range(1025)}}, "sampling.logit_bias", "at most 1024"),
        ({"stop": ["x"] * 129}, "sampling.stop", "at most 128"),
        ({"seed": 2**63}, "sampling.seed", str(2**63)),
        ({"seed": -(2**63) - 1}, "sampling.seed", str(-(2**63) - 1)),
        ({"max_tokens": 2**31}, "sampling.max_tokens", str(2**31)),
        ({"min_tokens": 2**64, "max_tokens": 16}, "sampling.min_tokens", str(2**64)),
        ({"top_k": 2**70}, "sampling.top_k", str(2**70)),
        ({"logprobs": 2**64}, "sampling.logprobs", str(2**64)),
        ({"prompt_logprobs": 2**64}, "sampling.prompt_logprobs", str(2**64)),
        ({"temperature": 2.5}, "sampling.temperature", "2.5"),
        ({"temperature": float("nan")}, "sampling.temperature", "nan"),
        ({"repetition_penalty": float("inf")}, "sampling.repetition_penalty", "inf"),
    ],
)
def test_values_beyond_what_vllm_holds_are_refused_naming_the_field(sampling, field, text):
    with pytest.raises(InvalidArgument) as info:
        _parse(**sampling)
    assert info.value.field == field and text in str(info.value), info.value


def test_seeds_span_int64_and_versions_uint64():
    assert _parse(seed=2**63 - 1).sampling.seed == 2**63 - 1 and _parse(seed=-(2**63)).sampling.seed == -(2**63)
    assert GenerateRequest.parse({"prompts": [{"text": "x"}], "min_weight_version": 2**64 - 1}).min_weight_version == 2**64 - 1
    with pytest.raises(InvalidArgument, match="min_weight_version"):
        GenerateRequest.parse({"prompts": [{"text": "x"}], "min_weight_version": 2**64})


def test_token_ids_are_int32_arrays_and_a_value_beyond_int32_is_named_by_its_index():
    req = GenerateRequest.parse(b'{"prompts": [{"token_ids": [1, 2, 3]}]}')
    assert req.prompts[0].token_ids.typecode == "i" and req.prompts[0].token_ids.tolist() == [1, 2, 3]
    assert req.model_dump()["prompts"][0]["token_ids"] == [1, 2, 3]
    for bad in (2**31, -(2**31) - 1, 2**64, "7", 1.5):
        with pytest.raises(InvalidArgument, match=r"prompts\[0\]\.token_ids: token_ids\[1\]=") as info:
            GenerateRequest.parse({"prompts": [{"token_ids": [1, bad]}]})
        assert repr(bad) in str(info.value)


def test_a_huge_bad_value_is_shown_by_its_start_and_size_only():
    with pytest.raises(InvalidArgument) as info:
        _parse(allowed_token_ids=list(range(1_000_000)))
    assert len(str(info.value)) < 300 and "1000000 items" in str(info.value)


def test_json_nested_past_any_limit_is_invalid_json():
    with pytest.raises(InvalidArgument, match="body: invalid JSON"):
        GenerateRequest.parse(b'{"prompts": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")


def test_a_temperature_vllm_would_raise_to_its_minimum_is_refused_and_penalties_stay_finite():
    """vLLM samples 0 < T < 0.01 at 0.01 and returns that distribution's logprobs: refused. A
    repetition penalty of 1e-45 is 0 in float32, which would divide logits by zero."""
    for temperature in (1e-3, 1e-40):
        with pytest.raises(InvalidArgument, match="use 0 for greedy, or at least 0.01") as info:
            _parse(temperature=temperature)
        assert info.value.field == "sampling.temperature"
    assert _parse(temperature=0.01).sampling.temperature == 0.01 and _parse(temperature=0.0).sampling.temperature == 0.0
    for penalty in (1e-45, 0.009, 101.0):
        with pytest.raises(InvalidArgument) as info:
            _parse(repetition_penalty=penalty)
        assert info.value.field == "sampling.repetition_penalty"
