"""How the ingress reaches a replica for Generate: a call of ordinary size streams over Serve's
inter-deployment gRPC, one larger than the replica's gRPC message limit allows goes as Ray
objects. Serve's DeploymentHandle is replaced by a test double here (the real transport is
covered by tests/serve/test_cluster.py and bench/agentic_load.py)."""

from __future__ import annotations

from array import array

from rollout_service.serve import handle
from rollout_service.types import GenerateRequest, Prompt


class DeploymentHandleDouble:
    """Records the options of the handle each call went through."""

    def __init__(self, options: dict | None = None, calls: list | None = None):
        self.opts, self.calls = options or {}, [] if calls is None else calls

    def options(self, **kwargs):
        return DeploymentHandleDouble({**self.opts, **kwargs}, self.calls)

    @property
    def generate_stream(self):
        return self

    def remote(self, *args):
        self.calls.append(self.opts)
        return None


def request(tokens_per_prompt: int, prompts: int) -> GenerateRequest:
    return GenerateRequest(prompts=[Prompt(token_ids=array("i", [5] * tokens_per_prompt)) for _ in range(prompts)])


def test_a_call_of_ordinary_size_streams_over_grpc_and_a_large_batch_as_ray_objects():
    double = DeploymentHandleDouble()
    replicas = handle.ServeReplicas(double)
    replicas.generate(request(128, 1), "")
    replicas.generate(request(1024, 1024), "")  # 4 MiB of token ids: beyond the replica's gRPC limit
    assert [c.get("_by_reference", True) for c in double.calls] == [False, True]
    assert all(c["stream"] for c in double.calls)


def test_the_size_counts_token_ids_and_text():
    mixed = GenerateRequest(prompts=[Prompt(text="abcd"), Prompt(token_ids=array("i", [1, 2, 3]))])
    assert handle.request_bytes(mixed) == 16 + 12
