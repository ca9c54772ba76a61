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
