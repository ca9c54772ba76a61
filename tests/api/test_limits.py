"""api/limits: the bounds of a Generate call that need the server's settings or the model, checked
without an engine (the Serve ingress checks requests before any replica sees them)."""

from __future__ import annotations

import json
import shutil

import pytest
from rollout_client.proto.rollout.v1 import rollout_pb2 as pb

from rollout_service.api.limits import check_generate, check_generate_message, model_limits
from rollout_service.config import ServerConfig
from rollout_service.errors import InvalidArgument
from rollout_service.types import GenerateRequest


@pytest.fixture
def config(tiny_model) -> ServerConfig:
    return ServerConfig(model=tiny_model, max_model_len=256)


def _check(config, *, prompts=None, **sampling):
    check_generate(GenerateRequest.parse({"prompts": prompts or [{"text": "x"}], "sampling": sampling}), config)


def test_the_model_s_limits_come_from_its_checkpoint(tiny_model, tmp_path):
    limits = model_limits(tiny_model, 256)
    assert (limits.context, limits.vocab_size, limits.eos_ids) == (256, 2048, frozenset({0}))
    assert model_limits(tiny_model, None).context == 2048  # max_position_embeddings
    # A generation config's list of ids and a tokenizer config naming its token as a dict add theirs.
    other = tmp_path / "other"
    shutil.copytree(tiny_model, other)
    (other / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, 5, 9]}))
    tokenizer_config = json.loads((other / "tokenizer_config.json").read_text())
    (other / "tokenizer_config.json").write_text(json.dumps({**tokenizer_config, "eos_token": {"content": "<|endoftext|>"}}))
    assert model_limits(other, None).eos_ids == frozenset({0, 5, 9})


@pytest.mark.parametrize(
    "sampling, field, text",
    [
        ({"max_tokens": 257}, "sampling.max_tokens", "max_model_len=256"),
        ({"top_k": 2049}, "sampling.top_k", "vocabulary size 2048"),
        ({"logprobs": 21}, "sampling.logprobs", "max_logprobs=20"),
        ({"prompt_logprobs": 21}, "sampling.prompt_logprobs", "max_logprobs=20"),
        ({"stop_token_ids": [5, 2048]}, "sampling.stop_token_ids[1]", "2048"),
        ({"allowed_token_ids": [-1]}, "sampling.allowed_token_ids[0]", "-1"),
        ({"logit_bias": {"4096": 1.0}}, "sampling.logit_bias[4096]", "4096"),
        # 128 stop ids and the model's end-of-sequence id (0) are 129 held back with min_tokens.
        ({"stop_token_ids": list(range(1, 129)), "min_tokens": 1}, "sampling.stop_token_ids", "got 129"),
        ({"allowed_token_ids": [0, 3], "stop_token_ids": [3], "min_tokens": 2}, "sampling.min_tokens", "nothing could be sampled"),
    ],
)
def test_sampling_beyond_the_model_or_the_server_is_refused_naming_the_field(config, sampling, field, text):
    with pytest.raises(InvalidArgument) as info:
        _check(config, **sampling)
    assert info.value.field == field and text in str(info.value), info.value


def test_the_limits_themselves_are_allowed(config):
    _check(config, max_tokens=256, top_k=2048, logprobs=20, stop_token_ids=list(range(1, 128)), min_tokens=1)
    _check(config, allowed_token_ids=list(range(1024)), logit_bias={str(i): 1.0 for i in range(1024)})
    _check(config, stop_token_ids=list(range(2048)))  # without min_tokens no runner holds stop ids in an array


def test_prompt_token_ids_are_checked_against_the_vocabulary_and_the_context(config):
    with pytest.raises(InvalidArgument, match=r"token id 2048 is outside") as info:
        _check(config, prompts=[{"token_ids": [1, 2]}, {"token_ids": [3, 2048, 4]}])
    assert info.value.field == "prompts[1].token_ids[1]"
    with pytest.raises(InvalidArgument, match="256 prompt tokens leave no room") as info:
        _check(config, prompts=[{"token_ids": [1] * 256}])
    assert info.value.field == "prompts[0]"
    _check(config, prompts=[{"token_ids": [1] * 255}])


def test_a_protobuf_s_counts_are_checked_before_anything_is_copied_out_of_it(tiny_model):
    config = ServerConfig(model=tiny_model, max_model_len=256, max_prompts_per_call=3, max_prompt_tokens=8)
    with pytest.raises(InvalidArgument, match="4 prompts exceed max_prompts_per_call=3"):
        check_generate_message(pb.GenerateRequest(prompts=[pb.Prompt(text="x")] * 4), config)
    with pytest.raises(InvalidArgument, match="9 prompt tokens exceed max_prompt_tokens=8") as info:
        check_generate_message(pb.GenerateRequest(prompts=[pb.Prompt(token_ids=[1] * 8), pb.Prompt(token_ids=[1] * 9)]), config)
    assert info.value.field == "prompts[1].token_ids"
    with pytest.raises(InvalidArgument, match="beyond any tokenization within 8 tokens"):
        check_generate_message(pb.GenerateRequest(prompts=[pb.Prompt(text="x" * (8 * 64 + 1))]), config)
    check_generate_message(pb.GenerateRequest(prompts=[pb.Prompt(token_ids=[1] * 8)] * 3), config)


@pytest.mark.parametrize(
    "sampling, field",
    [
        ({"allowed_token_ids": [1] * 1025}, "sampling.allowed_token_ids"),
        ({"logit_bias": {i: 1.0 for i in range(1025)}}, "sampling.logit_bias"),
        ({"stop": ["x"] * 129}, "sampling.stop"),
        ({"stop_token_ids": [1] * 2049}, "sampling.stop_token_ids"),  # more than the vocabulary holds
    ],
)
def test_a_protobuf_s_sampling_lists_are_counted_before_they_are_copied(config, sampling, field):
    with pytest.raises(InvalidArgument) as info:
        check_generate_message(pb.GenerateRequest(prompts=[pb.Prompt(text="x")], sampling=pb.SamplingParams(**sampling)), config)
    assert info.value.field == field


def test_a_protobuf_s_ids_are_measured_before_they_are_copied(config):
    for field in ("request_id", "session_id"):
        with pytest.raises(InvalidArgument, match="at most 256") as info:
            check_generate_message(pb.GenerateRequest(prompts=[pb.Prompt(text="x")], **{field: "r" * 257}), config)
        assert info.value.field == field
