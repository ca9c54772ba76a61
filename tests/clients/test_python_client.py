"""The Python client's request building and error typing (no server needed)."""

import grpc
import pytest

from rollout_client import (
    AbortedError,
    DataLossError,
    InvalidArgumentError,
    ResourceExhaustedError,
    RolloutClientError,
)
from rollout_client.client import build_request
from rollout_client.errors import from_rpc_error


def test_text_and_token_prompts_and_sampling_are_set():
    req = build_request(["a"], [[1, 2]], "rid", {"n": 2, "temperature": 0.0, "stop": ["x"]})
    assert req.prompts[0].text == "a" and list(req.prompts[1].token_ids) == [1, 2]
    assert req.sampling.HasField("temperature") and req.sampling.temperature == 0.0
    assert not req.sampling.HasField("top_p") and req.request_id == "rid"


def test_version_requirements_go_in_the_request_not_the_sampling():
    req = build_request(None, [[1]], "", {"min_weight_version": 4, "max_staleness": 0, "n": 2})
    assert (req.min_weight_version, req.max_staleness, req.HasField("max_staleness"), req.sampling.n) == (4, 0, True, 2)
    assert not build_request(None, [[1]], "", {}).HasField("max_staleness")


def test_a_resumed_sample_joins_tokens_logprobs_and_version_runs():
    import numpy as np

    from rollout_client.client import continuation
    from rollout_client.types import Completion, Sample, joined

    head = Sample([5, 6], "ab", np.array([-1.0, -2.0], np.float32), "aborted", 3, first_weight_version=3,
                  token_weight_versions=[(3, 2)])
    tail = Sample([7], "c", np.array([-0.5], np.float32), "length", 4, first_weight_version=4, token_weight_versions=[(4, 1)])
    whole = joined(head, tail)
    assert (whole.token_ids, whole.text, whole.logprobs.tolist(), whole.finish_reason) == ([5, 6, 7], "abc", [-1.0, -2.0, -0.5], "length")
    assert (whole.first_weight_version, whole.weight_version, whole.token_weight_versions) == (3, 4, [(3, 2), (4, 1)])
    assert joined(head, Sample([8], "d", np.array([-0.1], np.float32), "stop", 3, token_weight_versions=[(3, 1)])).token_weight_versions == [(3, 3)]
    completion = Completion(0, [1, 2], [head])
    assert continuation(completion, head, 5, {"temperature": 0.7, "n": 4, "min_tokens": 3}) == {
        "prompt_token_ids": [[1, 2, 5, 6]], "max_tokens": 3, "n": 1, "temperature": 0.7, "min_tokens": 1}
    assert continuation(completion, head, 2, {}) is None  # nothing left to generate
    assert continuation(completion, tail, 5, {}) is None  # not aborted: it ended by itself


def test_unknown_sampling_parameter_is_a_type_error_naming_it():
    with pytest.raises(TypeError, match="temprature"):
        build_request(["a"], None, "", {"temprature": 1.0})


class FakeRpcErrorForClientUnitTest(grpc.RpcError):
    def __init__(self, code, details):
        self._code, self._details = code, details

    def code(self):
        return self._code

    def details(self):
        return self._details


@pytest.mark.parametrize(
    "code, cls",
    [
        (grpc.StatusCode.INVALID_ARGUMENT, InvalidArgumentError),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, ResourceExhaustedError),
        (grpc.StatusCode.DATA_LOSS, DataLossError),
        (grpc.StatusCode.ABORTED, AbortedError),
        (grpc.StatusCode.UNKNOWN, RolloutClientError),
    ],
)
def test_rpc_errors_become_typed_exceptions_carrying_the_code(code, cls):
    err = from_rpc_error(FakeRpcErrorForClientUnitTest(code, "sampling.top_p: bad"))
    assert type(err) is cls and err.code == code and err.details == "sampling.top_p: bad"


def test_a_push_committed_with_a_problem_says_so_as_a_warning():
    from rollout_client.proto.rollout.v1 import rollout_pb2 as pb
    from rollout_client.push import result_from_proto

    reply = pb.PushWeightsResponse(version=3, warnings=["the weight store's directory could not be synced"])
    with pytest.warns(UserWarning, match="push committed as version 3, with a problem: the weight store's directory"):
        result = result_from_proto(reply, 1.0)
    assert result.version == 3 and result.warnings == ["the weight store's directory could not be synced"]
