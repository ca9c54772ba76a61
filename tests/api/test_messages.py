"""Protobuf -> request: unset optional fields take the defaults; set ones are kept, zero included."""

from array import array

import pytest
from rollout_client.proto.rollout.v1 import rollout_pb2 as pb

from rollout_service.api.messages import completion_to_proto, request_from_proto
from rollout_service.errors import InvalidArgument
from rollout_service.types import Completion, Sample, TopLogprobs


def test_unset_optionals_take_defaults_and_zero_values_are_kept():
    msg = pb.GenerateRequest(prompts=[pb.Prompt(text="x")], sampling=pb.SamplingParams(temperature=0.0, seed=2**40))
    req = request_from_proto(msg)
    assert req.sampling.temperature == 0.0  # explicitly set zero, not the default 1.0
    assert req.sampling.seed == 2**40
    assert req.sampling.top_p == 1.0 and req.sampling.max_tokens == 16


def test_sampling_options_arrive_with_logit_bias_keyed_by_token_id():
    params = pb.SamplingParams(min_tokens=3, repetition_penalty=1.25, presence_penalty=-0.5, frequency_penalty=0.75,
                               logit_bias={7: 2.5, 9: -100.0}, allowed_token_ids=[7, 9, 11])
    s = request_from_proto(pb.GenerateRequest(prompts=[pb.Prompt(text="x")], sampling=params)).sampling
    assert (s.min_tokens, s.repetition_penalty, s.presence_penalty, s.frequency_penalty) == (3, 1.25, -0.5, 0.75)
    assert s.logit_bias == {7: 2.5, 9: -100.0} and s.allowed_token_ids == [7, 9, 11]


def test_token_id_prompts_and_validation_errors_name_the_index():
    msg = pb.GenerateRequest(prompts=[pb.Prompt(token_ids=[1, 2]), pb.Prompt()])
    with pytest.raises(InvalidArgument) as info:
        request_from_proto(msg)
    assert info.value.field == "prompts[1]"


def test_completion_round_trips_into_the_proto():
    c = Completion(
        prompt_index=3,
        prompt_token_ids=array("i", [1, 2]),
        samples=[Sample([7, 8], "ab", [-0.5, -1.5], "length", 4, top_logprobs=[TopLogprobs([7, 9], [-0.5, -2.0])] * 2)],
        request_id="r",
    )
    msg = completion_to_proto(c)
    assert msg.prompt_index == 3 and list(msg.samples[0].token_ids) == [7, 8]
    assert list(msg.samples[0].logprobs) == [-0.5, -1.5]
    assert msg.samples[0].finish_reason == pb.FINISH_REASON_LENGTH and msg.samples[0].weight_version == 4
    assert list(msg.samples[0].top_logprobs[1].token_ids) == [7, 9]
