"""Ray Serve across two nodes that share no filesystem (tests/two_nodes.py): the ingress on the head,
the engine replicas on a worker node that sees none of the head's files, the weight store in an S3
bucket (a real S3 server, moto). Pushes reach the replicas through Ray's object store, a replica
added later and a restarted deployment load the current version from the bucket, and every replica
then serves bitwise the same greedy tokens and logprobs as a fresh engine loaded from the bucket.
One cluster serves the module; the tests build on each other."""

from __future__ import annotations

import os
import shutil
import time

import pytest

from rollout_service.config import ServerConfig
from tests.serve.conftest import GREEDY, perturbed
from tests.two_nodes import MULTI_NODE, RESOURCE, start_two_nodes

pytestmark = pytest.mark.engine

@pytest.fixture(scope="module")
def two_nodes(tiny_model, redis_server, s3_server, tmp_path_factory, request):
    """The cluster, its deployment (1 replica on the worker node) and a client."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("the worker node's own mount namespace needs root and unshare (util-linux)")
    import ray
    import ray._private.ray_constants as ray_constants
    from ray import serve
    from ray._raylet import AuthenticationTokenLoader, Config

    from rollout_client import RolloutClient
    from rollout_service.serve.runner import deploy, start_ray

    root = tmp_path_factory.mktemp("two-nodes")  # the head's store, staging and cache: hidden from the worker
    nodes = start_two_nodes([root], tmp_path_factory.mktemp("two-nodes-logs"), env=s3_server.env())
    saved = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS", MULTI_NODE)}
    single_machine = ray_constants.ENABLE_RAY_CLUSTER

    def restore():
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
        ray_constants.ENABLE_RAY_CLUSTER = single_machine
        nodes.stop()

    request.addfinalizer(restore)
    os.environ.pop("RAY_AUTH_TOKEN_PATH", None)
    os.environ.update(nodes.env())
    # A loopback node earlier in this session (tests/serve/test_cluster.py) put this process in Ray's
    # single-machine mode, where a driver takes 127.0.0.1 for its node: this cluster is on the
    # machine's address.
    os.environ[MULTI_NODE] = "1"
    ray_constants.ENABLE_RAY_CLUSTER = True
    Config.initialize("")  # this process read Ray's token settings before they changed
    AuthenticationTokenLoader.instance().reset_cache()
    config = ServerConfig(
        model=tiny_model, port=0, http_port=None, max_model_len=128, replicas=1, replica_cpus=1,
        replica_resource=RESOURCE, redis_url=redis_server.url, weights_dir=f"s3://{s3_server.new_bucket()}/store",
        cache_dir=root / "cache",
    )
    start_ray(nodes.address, include_dashboard=False, logging_level="WARNING")
    ingress = deploy(config)

    class Deployment:
        def __init__(self):
            self.config, self.nodes, self.root = config, nodes, root
            self.connect(ingress)

        def connect(self, handle):
            self.grpc = handle.endpoints.remote().result(timeout_s=120)["grpc"]
            self.client = RolloutClient(self.grpc, timeout=300)
            self.engines = serve.get_deployment_handle("EngineReplica", "rollout")

        def redeploy(self, **changes):
            self.client.close()
            self.config = self.config.model_copy(update=changes)
            self.connect(deploy(self.config))

        def per_replica(self, method: str, *args) -> list:
            return self.engines.broadcast(method, *args).results(timeout_s=300)

        def greedy(self) -> list[list[tuple[list[int], list[float], int]]]:
            """Each replica's greedy outputs for the same prompts, each call pinned to its replica."""
            stream = self.engines.options(stream=True)
            out = []
            for info in self.per_replica("info"):
                done = [c for r in GREEDY for c in stream.generate_stream.remote(r, info["replica_id"])]
                out.append([(list(c.samples[0].token_ids), list(c.samples[0].logprobs), c.samples[0].weight_version) for c in done])
            return out

    d = Deployment()
    yield d
    d.client.close()
    ray.shutdown()  # the nodes are killed next (restore), Serve's replicas with them


def test_the_engines_run_on_the_worker_node_and_the_ingress_on_the_head(two_nodes):
    from ray._private.state import actors  # the GCS's table: the head runs no dashboard for the state API

    alive = [a for a in actors().values() if a["State"] == "ALIVE"]
    engines = {a["Address"]["NodeID"] for a in alive if "EngineReplica" in a["ActorClassName"]}
    ingress = {a["Address"]["NodeID"] for a in alive if "Ingress" in a["ActorClassName"]}
    assert len(engines) == 1 and len(ingress) == 1 and engines != ingress
    (info,) = two_nodes.per_replica("info")
    assert info["version"] == 0


def test_pushes_reach_a_replica_that_sees_none_of_the_ingress_files(two_nodes, base_weights):
    """A whole push and a delta push: the replica on the worker node takes them through Ray (it
    cannot read the ingress's staging or the store's spool: both are on the head's disk)."""
    from tests.weights.conftest import step

    before = two_nodes.greedy()[0]
    w1 = perturbed(base_weights, 1)
    first = two_nodes.client.push_weights(w1, label="whole", delta=True)  # whole: the client's delta base
    assert first.version == 1
    delta = two_nodes.client.push_weights(step(w1, seed=2), delta=True, shared_memory=False)  # an optimizer step's change
    assert delta.version == 2 and delta.delta_tensors == len(base_weights)
    (after,) = two_nodes.greedy()
    assert {v for _, _, v in after} == {2} and [t for t, _, _ in after] != [t for t, _, _ in before]
    (info,) = two_nodes.per_replica("info")
    assert info["loaded"] == {"push": 2, "store": 0}  # from the pushes' parts, not caught up from the bucket


def test_a_replica_added_later_loads_the_current_version_from_the_bucket_bitwise(two_nodes, base_weights):
    """The second replica starts after the pushes and loads version 2 from the S3 store: a fresh
    engine loading the same weights, which must serve bitwise what the pushed one serves (greedy
    tokens and logprobs; a broadcast of whole engine snapshots from another node crashes Ray
    2.60's driver with ObjectUnknownOwner); a push afterwards reaches both through Ray and they
    agree again."""
    start = time.monotonic()
    two_nodes.redeploy(replicas=2)
    print(f"\nscale 1 -> 2 replicas on the worker node, the new one at version 2 from S3: {time.monotonic() - start:.1f} s")
    infos = two_nodes.per_replica("info")
    assert len(infos) == 2 and {i["version"] for i in infos} == {2}
    assert sorted(i["loaded"]["store"] for i in infos) == [0, 1]  # the new one from the bucket
    a, b = two_nodes.greedy()
    assert a == b and {v for _, _, v in a} == {2}
    result = two_nodes.client.push_weights(perturbed(base_weights, 3))
    assert result.version == 3 and result.replicas_catching_up == []
    a, b = two_nodes.greedy()
    assert a == b and {v for _, _, v in a} == {3}
    assert sorted(i["loaded"]["push"] for i in two_nodes.per_replica("info")) == [1, 3]  # both took push 3's parts


@pytest.mark.slow  # two more engine starts: make test-all
def test_a_restarted_deployment_resumes_from_the_bucket(two_nodes, base_weights):
    """The application deleted and deployed again (ingress and replicas new): it serves version 3
    from S3 as before, and numbers the next push 4."""
    from ray import serve

    held = two_nodes.greedy()[0]
    serve.delete("rollout")
    two_nodes.redeploy()
    assert {i["version"] for i in two_nodes.per_replica("info")} == {3}
    assert all(outputs == held for outputs in two_nodes.greedy())
    assert two_nodes.client.push_weights(perturbed(base_weights, 4)).version == 4


@pytest.mark.slow  # two more engine starts: make test-all
def test_int8_replicas_on_the_worker_take_the_parts_the_ingress_requantized(two_nodes, base_weights):
    """int8 replicas on the worker node: the ingress on the head requantizes each pushed tensor
    once and both replicas take its parts through Ray; they serve the same outputs at the new
    version, whole and delta."""
    from ray import serve

    from tests.weights.conftest import step

    serve.delete("rollout")
    two_nodes.redeploy(quantization="int8", replicas=2)
    w = perturbed(base_weights, 6)
    whole = two_nodes.client.push_weights(w, delta=True)
    a, b = two_nodes.greedy()
    assert a == b and {v for _, _, v in a} == {whole.version}
    delta = two_nodes.client.push_weights(step(w, seed=7), delta=True, shared_memory=False)
    assert delta.version == whole.version + 1 and delta.delta_tensors == len(base_weights)
    a, b = two_nodes.greedy()
    assert a == b and {v for _, _, v in a} == {delta.version}
    assert [i["loaded"]["push"] for i in two_nodes.per_replica("info")] == [2, 2]  # through Ray, not the bucket
