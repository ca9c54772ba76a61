"""The Ray Serve deployment end to end: real Ray Serve, real vLLM engine replicas, a real
redis-server. One deployment serves the whole module, so the tests run in order and build on each
other: 1 replica -> concurrent pushes -> 3 versions -> scaled to 2 replicas -> pushes that reach
both or neither -> Redis restarted under it. It serves as a network deployment would: API keys and
TLS (a server certificate; client certificates are tested on the local server, tests/api/test_security.py),
JSON log lines, and traces sent to an OTLP receiver (`otlp_sink`).
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import grpc
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from safetensors.torch import save

from rollout_client import AbortedError, PermissionDeniedError, RolloutClient, UnauthenticatedError
from rollout_client import RolloutClientError as RolloutError
from rollout_service import faults
from rollout_service.config import ServerConfig
from tests.observability import traced
from tests.observe import InBackground, wait_until
from tests.serve.conftest import GREEDY, PROMPTS, perturbed
from tests.tls import Pki

pytestmark = pytest.mark.engine

KEYS = {"admin": "cluster-admin-key-0123456789", "trainer": "cluster-trainer-key-01234567", "eval": "cluster-eval-key-0123456789ab"}



@pytest.fixture(scope="module")
def cluster(tiny_model, redis_server, tmp_path_factory, request, otlp_sink):
    import ray
    from ray import serve

    from rollout_service.serve.app import APP_NAME
    from rollout_service.serve.runner import deploy, start_ray

    root = tmp_path_factory.mktemp("serve")
    fault = root / "fault"  # the replicas' and the ingress's fault point (rollout_service/faults.py)
    os.environ[faults.ENV] = str(fault)  # read when the application is built: its processes get it
    request.addfinalizer(lambda: os.environ.pop(faults.ENV, None))
    os.environ["OTEL_BSP_SCHEDULE_DELAY"] = "100"  # spans leave within 0.1 s, not 5 (OTEL_* reach the deployment)
    request.addfinalizer(lambda: os.environ.pop("OTEL_BSP_SCHEDULE_DELAY", None))
    pki = Pki.make(root / "pki")
    keys = root / "api-keys"
    keys.write_text("".join(f"{role}:{key}\n" for role, key in KEYS.items()))
    config = ServerConfig(
        model=tiny_model, port=0, http_port=0, max_model_len=128, replicas=1, replica_cpus=0.5,
        redis_url=redis_server.url, weights_dir=root / "weights", cache_dir=root / "cache", debug_endpoints=True,
        api_keys=keys, tls_cert=pki.server_cert, tls_key=pki.server_key, log_format="json", otlp_endpoint=otlp_sink.endpoint,
    )
    start_ray(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    ingress = deploy(config)
    ends = ingress.endpoints.remote().result()

    class Cluster:
        def rpc(self, role: str = "admin") -> RolloutClient:
            return RolloutClient(self.grpc, timeout=300, api_key=KEYS[role], root_certificates=pki.ca)

        def https(self, role: str | None = "admin") -> httpx.Client:
            headers = {"authorization": f"Bearer {KEYS[role]}"} if role else {}
            return httpx.Client(base_url=self.http, headers=headers, verify=pki.client_context(False), timeout=60)

    c = Cluster()
    c.grpc, c.http = ends["grpc"], f"https://{ends['http']}"
    c.client_ca, c.pki, c.fault = pki.ca, pki, fault
    client = c.rpc()
    c.config, c.client, c.redis = config, client, redis_server
    c.engines = serve.get_deployment_handle("EngineReplica", "rollout")

    def redeploy(**changes):
        c.config = c.config.model_copy(update=changes)
        deploy(c.config)

    def reconnect():
        """Point the clients at the ingress's endpoints (a restarted ingress listens on new ports)."""
        found = serve.get_app_handle(APP_NAME).endpoints.remote().result(timeout_s=120)
        c.grpc, c.http = found["grpc"], f"https://{found['http']}"
        c.client.close()
        c.client = c.rpc()
        c.engines = serve.get_deployment_handle("EngineReplica", APP_NAME)

    c.redeploy, c.reconnect = redeploy, reconnect
    yield c
    c.client.close()
    serve.shutdown()
    ray.shutdown()


def per_replica(cluster, method: str, *args) -> list:
    return cluster.engines.broadcast(method, *args).results(timeout_s=120)


def greedy_by_replica(cluster) -> list[list[tuple[list[int], list[float], int]]]:
    """Each replica's greedy outputs for the same prompts: (tokens, logprobs, weight_version). Each
    call is pinned to its replica as a part of a split batch is (serve/routing.py)."""
    stream = cluster.engines.options(stream=True)
    replicas = [i["replica_id"] for i in per_replica(cluster, "info")]
    outputs = []
    for replica in replicas:
        done = [c for request in GREEDY for c in stream.generate_stream.remote(request, replica)]
        outputs.append([(list(c.samples[0].token_ids), list(c.samples[0].logprobs), c.samples[0].weight_version) for c in done])
    return outputs


def test_concurrent_pushes_exactly_one_wins_the_other_is_aborted(cluster, base_weights):
    outcomes: list = []
    decided = threading.Event()

    def held(weights):  # after its header each push waits until one is refused: they overlap for sure
        items = iter(weights.items())
        yield next(items)
        decided.wait(120)
        yield from items

    def push(seed):
        with cluster.rpc() as c:
            try:
                outcomes.append(c.push_weights(held(perturbed(base_weights, seed))).version)
            except RolloutError as err:
                outcomes.append(err)
            finally:
                decided.set()

    threads = [threading.Thread(target=push, args=(s,)) for s in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(outcomes) == 2 and 1 in outcomes, outcomes
    loser = next(o for o in outcomes if o != 1)
    assert isinstance(loser, AbortedError) and "another push is in progress" in str(loser)
    assert cluster.client.status().weight_version == 1


def test_a_replica_added_after_three_pushes_serves_version_3_before_taking_traffic(cluster, base_weights):
    for seed in (3, 4):
        cluster.client.push_weights(perturbed(base_weights, seed))
    assert cluster.client.status().weight_version == 3
    start = time.monotonic()
    cluster.redeploy(replicas=2)  # returns once the new replica is ready, i.e. has loaded version 3
    print(f"\nscale 1 -> 2 replicas: new replica ready at version 3 after {time.monotonic() - start:.1f} s")
    infos = per_replica(cluster, "info")
    assert len(infos) == 2 and {i["version"] for i in infos} == {3}
    old, new = greedy_by_replica(cluster)
    assert old == new and {v for _, _, v in old} == {3}
    assert cluster.client.status().replicas == 2


def test_a_push_reaches_both_replicas_which_then_agree_at_the_new_version(cluster, base_weights):
    before = greedy_by_replica(cluster)[0]
    result = cluster.client.push_weights(perturbed(base_weights, 5), label="step-4")
    assert result.version == 4
    a, b = greedy_by_replica(cluster)
    assert a == b, "the replicas disagree after the push"
    assert {v for _, _, v in a} == {4}
    assert [t for t, _, _ in a] != [t for t, _, _ in before], "the push did not change the outputs"
    with cluster.https() as http:
        scraped = {f.name: f for f in text_string_to_metric_families(http.get("/metrics").text)}
    replicas = {i["replica_id"] for i in per_replica(cluster, "info")}
    assert [s.value for s in scraped["rollout_replicas"].samples] == [2]
    assert [s.value for s in scraped["rollout_committed_version"].samples] == [4]
    assert {s.labels["replica"]: s.value for s in scraped["rollout_replica_weight_version"].samples} == dict.fromkeys(replicas, 4)
    # Each replica's own vLLM metrics, from its actor's process, merged at the ingress.
    for name in ("vllm:num_requests_running", "vllm:kv_cache_usage_perc", "vllm:time_to_first_token_seconds"):
        assert {s.labels["replica"] for s in scraped[name].samples} == replicas, name
    served = {s.labels["replica"]: s.value for s in scraped["vllm:generation_tokens"].samples if s.name.endswith("_total")}
    assert served.keys() == replicas and all(served.values()), served  # both generated greedy_by_replica's tokens


@pytest.mark.reliability("fault")
def test_a_replica_failing_to_prepare_leaves_every_replica_on_the_old_version(cluster, base_weights, record_property):
    """One of two replicas fails to prepare a push: the push fails UNAVAILABLE naming it, both
    replicas stay on the old version with the same outputs, and nothing is left in the store."""
    before = greedy_by_replica(cluster)
    faults.arm(cluster.fault, "replica.prepare", fail="injected prepare failure")
    with pytest.raises(RolloutError) as err:
        cluster.client.push_weights(perturbed(base_weights, 6))
    assert not cluster.fault.exists()  # one replica reached it
    replicas = {i["replica_id"] for i in per_replica(cluster, "info")}
    assert err.value.code.name == "UNAVAILABLE" and "injected prepare failure" in str(err.value)
    assert any(f"replica {r} failed to prepare version 5" in str(err.value) for r in replicas), err.value
    assert {i["version"] for i in per_replica(cluster, "info")} == {4}
    assert greedy_by_replica(cluster) == before
    assert cluster.client.status().weight_version == 4
    assert not list(Path(cluster.config.weights_dir).glob("v000005*"))
    record_property("data lost", "none")


def test_session_calls_go_to_one_replica(cluster):
    def served():
        return {i["replica_id"]: s.counters.requests_total for i, s in per_replica(cluster, "served")}

    before = served()
    for _ in range(6):
        cluster.client.generate(prompt_token_ids=PROMPTS[:1], max_tokens=2, session_id="episode-17")
    after = served()
    assert sorted(after[r] - before[r] for r in before) == [0, 6], (before, after)


def test_a_verl_sized_batch_is_split_across_both_replicas_and_merged_in_order(cluster):
    """512 prompts x n=8 = 4,096 sequences in one call (4x max_inflight_sequences of a replica)."""
    def generated():
        return {i["replica_id"]: s.counters.tokens_generated for i, s in per_replica(cluster, "served")}

    prompts = [[10 + (i * 7 + j) % 2000 for j in range(6)] for i in range(512)]
    before = generated()
    start = time.monotonic()
    out = cluster.client.generate(prompt_token_ids=prompts, n=8, max_tokens=4, temperature=1.0, ignore_eos=True)
    elapsed = time.monotonic() - start
    after = generated()
    version = cluster.client.status().weight_version
    assert [c.prompt_token_ids for c in out] == prompts and [c.prompt_index for c in out] == list(range(512))
    samples = [s for c in out for s in c.samples]
    assert len(samples) == 4096
    assert all(len(s.token_ids) == 4 == len(s.logprobs) and s.weight_version == version for s in samples)
    used = sorted(after[r] - before[r] for r in before)
    assert len(used) == 2 and min(used) > 0 and sum(used) == 4096 * 4, (before, after)
    print(f"4096 sequences x 4 tokens through 2 replicas: {elapsed:.1f} s, {4096 / elapsed:.0f} sequences/s")


def test_generation_held_on_every_replica_waits_until_resumed(cluster):
    http = cluster.https()
    http.post("/v1/debug/pause", params={"mode": "continue"}).raise_for_status()
    try:
        call = InBackground(lambda: cluster.client.generate(prompt_token_ids=PROMPTS[:1], max_tokens=2))
        wait_until(lambda: cluster.client.status().counters.engine_requests_running == 1, "the call in an engine")
        assert not call.done()  # held: the engine has not stepped it
    finally:
        http.post("/v1/debug/resume").raise_for_status()
    assert len(call.outcome()[0].samples[0].token_ids) == 2


def test_every_role_on_grpc_and_https_through_the_ingress(cluster, base_weights):
    version = cluster.client.status().weight_version
    with cluster.rpc("eval") as evaluator:
        assert evaluator.generate(prompt_token_ids=PROMPTS[:1], max_tokens=2)[0].samples[0].weight_version == version
        with pytest.raises(PermissionDeniedError):
            evaluator.push_weights(perturbed(base_weights, 9))
    with cluster.rpc("trainer") as trainer:  # let in, and refused on its stale expected_version
        with pytest.raises(RolloutError, match="FAILED_PRECONDITION"):
            trainer.push_weights(perturbed(base_weights, 9), expected_version=version - 1)
    with RolloutClient(cluster.client.address, timeout=60, root_certificates=cluster.client_ca) as stranger:
        with pytest.raises(UnauthenticatedError):
            stranger.status()
    body = save({"model.norm.weight": base_weights["model.norm.weight"]})
    for role, status, push in ((None, 401, 401), ("eval", 200, 403), ("trainer", 200, 412)):
        with cluster.https(role) as http:
            assert http.get("/v1/status").status_code == status
            reply = http.post("/v1/weights", params={"expected_version": version - 1}, content=body)
            assert reply.status_code == push, reply.text
            assert http.get("/healthz").status_code == 200
    assert cluster.client.status().weight_version == version


def test_openai_clients_reach_the_replicas_through_the_ingress_and_a_session_stays_on_one(cluster, tiny_model):
    import openai

    def served():
        return {i["replica_id"]: s.counters.requests_total for i, s in per_replica(cluster, "served")}

    version = cluster.client.status().weight_version
    http = httpx.Client(verify=cluster.pki.client_context(False), timeout=120)
    with openai.OpenAI(base_url=f"{cluster.http}/v1", api_key=KEYS["eval"], max_retries=0, http_client=http) as oai:
        assert oai.models.list().data[0].id == tiny_model.name
        before = served()
        chat = oai.chat.completions.create(
            model=tiny_model.name, messages=[{"role": "user", "content": "hi"}], max_tokens=4, seed=1,
            extra_body={"return_token_ids": True, "session_id": "agent-1"},
        )
        turn = chat.model_extra["prompt_token_ids"] + chat.choices[0].model_extra["token_ids"]
        for _ in range(3):  # token in, token out: each turn extends the last one's ids
            reply = oai.completions.create(model=tiny_model.name, prompt=turn, max_tokens=4,
                                           extra_body={"session_id": "agent-1", "return_token_ids": True})
            assert reply.choices[0].model_extra["weight_version"] == version
            turn = turn + reply.choices[0].model_extra["token_ids"]
        after = served()
        calls = [after[r] - before[r] for r in before]
        assert max(calls) == sum(calls) == 4, (before, after)  # all on one replica
        whole = oai.completions.create(model=tiny_model.name, prompt=["a", "b", "c"], n=2, max_tokens=2)
        assert [c.index for c in whole.choices] == list(range(6))
        assert {c.model_extra["weight_version"] for c in whole.choices} == {version}


@pytest.mark.reliability("fault")
def test_a_replica_failing_to_load_a_committed_push_catches_up_and_the_push_stands(cluster, base_weights, record_property):
    """One of two replicas fails to load a push after its commit: the push stands, names the
    replica in replicas_catching_up, and the client returns once it has loaded the version from
    the weight store; both replicas then agree."""
    faults.arm(cluster.fault, "replica.apply", fail="injected apply failure")
    result = cluster.client.push_weights(perturbed(base_weights, 10), label="catch-up")
    replicas = {i["replica_id"] for i in per_replica(cluster, "info")}
    assert result.version == 5 and len(result.replicas_catching_up) == 1 and set(result.replicas_catching_up) <= replicas
    # The client returned once every replica served version 5 (GetStatus reports the minimum).
    status = cluster.client.status()
    assert status.weight_version == status.committed_version == 5
    assert dict(status.replica_versions) == {i["replica_id"]: 5 for i in per_replica(cluster, "info")}
    assert {i["version"] for i in per_replica(cluster, "info")} == {5}
    a, b = greedy_by_replica(cluster)
    assert a == b and {v for _, _, v in a} == {5}
    record_property("data lost", "none")


@pytest.mark.reliability("fault")
def test_redis_restart_generation_continues_version_recovered_next_push_works(cluster, base_weights, record_property):
    """Redis killed under the deployment: generation goes on, a push is refused UNAVAILABLE
    naming Redis; Redis restarted empty: the ingress writes the version back, and pushes go on."""
    import redis

    cluster.redis.stop()
    completions = cluster.client.generate(prompt_token_ids=PROMPTS, max_tokens=4)
    assert all(c.samples[0].weight_version == 5 for c in completions)
    with pytest.raises(RolloutError) as err:  # no push lock without Redis: refused, clearly
        cluster.client.push_weights(perturbed(base_weights, 7))
    assert err.value.code.name == "UNAVAILABLE" and "redis" in str(err.value)
    cluster.redis.start()  # empty: no persistence
    r = redis.Redis.from_url(cluster.redis.url, decode_responses=True)
    start = time.monotonic()
    while r.get("rollout:version") is None:
        assert time.monotonic() - start < 30, "the version was not written back to Redis"
        time.sleep(0.1)
    print(f"\nredis restarted: version written back after {time.monotonic() - start:.1f} s")
    record_property("Redis restarted to version written back (s)", time.monotonic() - start)
    assert r.get("rollout:version") == "5"
    assert r.get("rollout:manifest").endswith("v000005/manifest.json")
    assert cluster.client.push_weights(perturbed(base_weights, 8)).version == 6
    assert {i["version"] for i in per_replica(cluster, "info")} == {6}
    events = r.xrange("rollout:events")
    assert [e["version"] for _, e in events] == ["6"]
    assert len([k for k in r.scan_iter("rollout:replica:*")]) == 2
    record_property("data lost", "none")


# ---- faults with real processes: a replica, the ingress, the whole service ---------------------


def running(deployment: str) -> int:
    from ray import serve

    from rollout_service.serve.app import APP_NAME

    app = serve.status().applications.get(APP_NAME)
    states = app.deployments[deployment].replica_states if app and deployment in app.deployments else {}
    return states.get("RUNNING", 0)


def live_replicas(cluster) -> list[dict]:
    """The registry entries of the engine replicas that answer (a dead one Serve has not yet
    removed fails its call and is left out)."""
    from rollout_service.serve.handle import ServeReplicas

    async def ask():
        return [i for i in await ServeReplicas(cluster.engines).broadcast("info") if isinstance(i, dict)]

    import asyncio

    return asyncio.run(ask())


def generate_until(cluster, stop: threading.Event, outcomes: list) -> None:
    """Generate calls in a loop until `stop`: each one's (start time, versions of its samples) or
    (start time, its error code)."""
    with cluster.rpc() as c:
        while not stop.is_set():
            started = time.monotonic()
            try:
                out = c.generate(prompt_token_ids=PROMPTS, max_tokens=16, temperature=1.0)
                outcomes.append((started, {s.weight_version for comp in out for s in comp.samples}))
            except RolloutError as err:
                outcomes.append((started, err.code.name))


@pytest.mark.reliability("fault")
def test_a_replica_sigkilled_under_generation_and_a_push_is_replaced_and_catches_up(cluster, base_weights, record_property):
    """SIGKILL one of two engine replicas while calls run, then push at once. A call the dead
    replica held ends UNAVAILABLE (retried, it succeeds on the survivor); the push either fails
    cleanly (UNAVAILABLE, nothing committed: it reached the dead replica) or commits on every
    survivor; Serve starts a replacement, which loads the committed version before serving."""
    import os
    import signal

    before = cluster.client.status().committed_version
    victim = live_replicas(cluster)[0]
    stop, outcomes = threading.Event(), []
    callers = [threading.Thread(target=generate_until, args=(cluster, stop, outcomes)) for _ in range(2)]
    for t in callers:
        t.start()
    wait_until(lambda: len(outcomes) >= 2, "generation to run on the replicas")
    killed_at = time.monotonic()
    os.kill(victim["pid"], signal.SIGKILL)
    try:
        committed = cluster.client.push_weights(perturbed(base_weights, 9), label="replica killed").version
    except RolloutError as err:
        assert err.code.name == "UNAVAILABLE", err
        committed = before
    pushed_at = time.monotonic()
    assert committed in (before, before + 1)
    assert cluster.client.status().committed_version == committed
    wait_until(lambda: victim["replica_id"] not in {i["replica_id"] for i in live_replicas(cluster)}
               and len(live_replicas(cluster)) == 2 and running("EngineReplica") == 2,
               "Serve to replace the killed replica", timeout=600)
    recovered_s = time.monotonic() - killed_at
    stop.set()
    for t in callers:
        t.join(300)
    replicas = live_replicas(cluster)
    failed = [o for _, o in outcomes if isinstance(o, str)]
    print(f"\nreplica SIGKILLed: push {'committed' if committed > before else 'failed cleanly'}; replacement serving "
          f"v{replicas[0]['version']} after {recovered_s:.1f} s; calls meanwhile: {len(outcomes)}, failed: {len(failed)}")
    record_property("push during the kill", "committed on the survivor" if committed > before else "failed UNAVAILABLE, nothing committed")
    record_property("killed to replacement serving the committed version (s)", recovered_s)
    record_property("calls during / failed", f"{len(outcomes)} / {len(failed)}")
    assert {i["version"] for i in replicas} == {committed}
    assert set(failed) <= {"UNAVAILABLE"}, failed
    # Every sample is of a committed version, and each call begun after the push returned of its version.
    assert set().union(*(o for _, o in outcomes if isinstance(o, set))) <= {before, committed}
    late = [o for started, o in outcomes if started > pushed_at and isinstance(o, set)]
    assert late and set().union(*late) == {committed}, late[:5]
    record_property("data lost", "none")
    a, b = greedy_by_replica(cluster)
    assert a == b and {v for _, _, v in a} == {committed}


def ingress_pids() -> list[int]:
    import psutil

    return [p.pid for p in psutil.process_iter(["cmdline"]) if "ServeReplica:rollout:Ingress" in " ".join(p.info["cmdline"] or [])]


@pytest.mark.reliability("fault")
def test_the_ingress_sigkilled_mid_push_comes_back_on_the_last_committed_version(cluster, base_weights, record_property):
    """SIGKILL the ingress while a push streams in: the push fails UNAVAILABLE, Serve restarts the
    ingress, which serves the last committed version with nothing of the push left in the store;
    a trainer fenced on that version pushes on once the dead ingress's push lock has lapsed (until
    then a push is ABORTED: the lock cannot tell a dead holder from a slow one)."""
    import os
    import signal

    before = cluster.client.status().committed_version
    store = Path(cluster.config.weights_dir)
    sent, release = threading.Event(), threading.Event()

    def held(weights):
        items = iter(weights.items())
        yield next(items)
        sent.set()
        release.wait(120)
        yield from items

    with cluster.rpc() as pusher:
        pushing = InBackground(lambda: pusher.push_weights(held(perturbed(base_weights, 11)), progress=False))
        assert sent.wait(120)
        wait_until(lambda: any((store / "incoming").iterdir()), "the push to reach the ingress")
        [pid] = ingress_pids()
        killed_at = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        release.set()
        with pytest.raises(RolloutError) as err:
            pushing.outcome()
    assert err.value.code.name == "UNAVAILABLE", err.value
    wait_until(lambda: running("Ingress") == 1 and ingress_pids() not in ([], [pid]), "Serve to restart the ingress", timeout=300)
    cluster.reconnect()
    status = cluster.client.status()
    print(f"\ningress SIGKILLed mid-push: serving again after {time.monotonic() - killed_at:.1f} s at v{status.committed_version}")
    record_property("killed to serving again (s)", time.monotonic() - killed_at)
    assert status.committed_version == status.weight_version == before
    # Dropped once no push runs: after the dead ingress's push lock lapsed.
    wait_until(lambda: not any((store / "incoming").iterdir()), "the new ingress to drop the half-received push")
    record_property("killed to the half-received push dropped (s)", time.monotonic() - killed_at)
    assert {d.name.split("-")[0] for d in store.glob("v*")} <= {f"v{v:06d}" for v in range(1, before + 1)}
    pushed = []

    def fenced_push() -> bool:
        try:
            pushed.append(cluster.client.push_weights(perturbed(base_weights, 12), expected_version=before))
            return True
        except AbortedError:  # the killed ingress's push lock, until it lapses (LOCK_TTL_S)
            time.sleep(0.5)
            return False

    wait_until(fenced_push, "the killed ingress's push lock to lapse", timeout=180)
    record_property("killed to the next push committed (s)", time.monotonic() - killed_at)
    assert pushed[0].version == before + 1
    record_property("data lost", "none")


@pytest.mark.reliability("fault")
def test_the_whole_service_restarted_comes_back_on_the_last_committed_version_with_the_same_outputs(cluster, record_property):
    """The application deleted and deployed again on the same weight store: both replicas serve
    the last committed version with the same greedy tokens and logprobs as before."""
    from ray import serve

    from rollout_service.serve.app import APP_NAME
    from rollout_service.serve.runner import deploy

    version = cluster.client.status().committed_version
    before = greedy_by_replica(cluster)
    serve.delete(APP_NAME)
    start = time.monotonic()
    deploy(cluster.config)
    cluster.reconnect()
    print(f"\nwhole service restarted: serving v{version} again after {time.monotonic() - start:.1f} s")
    record_property("deployed again to serving the last committed version (s)", time.monotonic() - start)
    status = cluster.client.status()
    assert status.committed_version == status.weight_version == version and status.replicas == cluster.config.replicas
    assert greedy_by_replica(cluster) == before
    record_property("data lost", "none")


def test_a_delta_push_reaches_both_replicas_as_the_push_of_the_whole_tensors_does(cluster, base_weights):
    """The ingress rebuilds each delta tensor whole before anything else, so the replicas prepare
    and load what a whole push of the same weights gives them."""
    from tests.weights.conftest import step

    if cluster.config.replicas < 2:  # run alone: the module's earlier tests scale it to two
        cluster.redeploy(replicas=2)
    w1 = perturbed(base_weights, 10)
    w2 = step(w1, seed=11)
    with cluster.rpc("trainer") as trainer:
        first = trainer.push_weights(w1, delta=True)
        result = trainer.push_weights(w2, delta=True)
    assert result.version == first.version + 1 and result.delta_tensors == len(w2)
    assert result.bytes_received < 0.2 * result.dense_bytes, result.wire_ratio
    a, b = by_delta = greedy_by_replica(cluster)
    assert a == b and {v for _, _, v in a} == {result.version}
    whole = cluster.client.push_weights(w2)
    for replica, delta_outputs in zip(greedy_by_replica(cluster), by_delta):
        assert [(t, lp) for t, lp, _ in replica] == [(t, lp) for t, lp, _ in delta_outputs]
        assert {v for _, _, v in replica} == {whole.version}


def test_a_rollback_reaches_both_replicas_which_serve_the_kept_versions_outputs_again(cluster, base_weights):
    """Both replicas load the rolled-back version from the weight store (as a replica that missed a
    push does) and give the greedy outputs of the version rolled back to; a trainer's key may not."""
    if cluster.config.replicas < 2:  # run alone: the module's earlier tests scale it to two
        cluster.redeploy(replicas=2)
    kept = cluster.client.push_weights(perturbed(base_weights, 20), label="kept").version
    before = greedy_by_replica(cluster)
    cluster.client.push_weights(perturbed(base_weights, 21))
    with cluster.rpc("trainer") as trainer, pytest.raises(PermissionDeniedError):
        trainer.rollback(kept)
    result = cluster.client.rollback(kept, expected_version=kept + 1)
    assert (result.version, result.label, result.replicas_catching_up) == (kept + 2, f"rollback to v{kept}", [])
    assert {i["version"] for i in per_replica(cluster, "info")} == {kept + 2}
    for replica, outputs in zip(greedy_by_replica(cluster), before):
        assert [(t, lp) for t, lp, _ in replica] == [(t, lp) for t, lp, _ in outputs]
        assert {v for _, _, v in replica} == {kept + 2}
    assert [(v.version, v.label) for v in cluster.client.list_versions()][:3] == [
        (kept + 2, f"rollback to v{kept}"), (kept + 1, ""), (kept, "kept")
    ]
    with cluster.https() as http:  # the coordinator (Redis) recorded it as a push's version
        last = http.get("/v1/events", params={"after": "0", "count": 1000}).json()["events"][-1]
    assert (int(last["version"]), last["label"]) == (kept + 2, f"rollback to v{kept}")


def _tls_channel(cluster) -> grpc.Channel:
    return grpc.secure_channel(cluster.grpc, grpc.ssl_channel_credentials(Path(cluster.pki.ca).read_bytes()))


def test_a_generate_is_one_trace_from_the_ingress_through_a_replica_to_its_engine(cluster, otlp_sink):
    """The ingress and each replica are processes of their own, each exporting its spans: one
    trace holding all three shows the context crossed Ray. A refused call returns its id too."""
    key = (("authorization", f"Bearer {KEYS['admin']}"),)
    with _tls_channel(cluster) as channel, cluster.https() as http:
        traced.generate_in_callers_trace(otlp_sink, channel, key)
        traced.refused_generate_has_its_id(channel, http, key)


def test_a_push_has_a_span_per_phase_and_the_replicas_json_log_lines_carry_its_request_id(cluster, otlp_sink, tiny_model):
    import ray

    with cluster.https() as http:
        request_id = traced.push_in_callers_trace(otlp_sink, http, tiny_model)
    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    lines = [line for path in logs.rglob("*") if path.is_file() for line in path.read_text(errors="replace").splitlines()]
    applied = [r for r in traced.json_lines_with(request_id, lines)
               if r["logger"] == "rollout_service.replica" and "serves version" in r["message"]]
    assert len({r["message"].split()[1] for r in applied}) == 2, f"not a line of each replica with {request_id} in {logs}"


@pytest.mark.slow  # 3 min, the module's last: make test-all and make reliability (int8 pushes: tests/weights/test_push_int8.py)
def test_int8_replicas_take_a_push_requantized_once_at_the_ingress_as_a_late_replica_requantizes_the_store(cluster, base_weights):
    """int8 replicas: the ingress requantizes each pushed tensor once as it arrives and both
    replicas load its parts; a replica added afterwards loads the committed version from the
    store and requantizes it itself, and all three give the same greedy tokens and logprobs.
    (The parts are bitwise those of requantizing the stored tensors: tests/serve/test_cluster_push.py.)
    Last in the module: it leaves the deployment on int8 with 3 replicas."""
    from ray import serve

    from rollout_service.serve.app import APP_NAME
    from rollout_service.serve.runner import deploy

    serve.delete(APP_NAME)
    cluster.config = cluster.config.model_copy(update={"quantization": "int8", "replicas": 2})
    deploy(cluster.config)
    cluster.reconnect()
    result = cluster.client.push_weights(perturbed(base_weights, 30))
    assert result.requantize_s > 0 and not any((Path(cluster.config.weights_dir) / "incoming").iterdir())
    pushed = greedy_by_replica(cluster)
    assert pushed[0] == pushed[1] and {v for _, _, v in pushed[0]} == {result.version}
    cluster.redeploy(replicas=3)  # returns once the new replica has loaded the version from the store
    by_replica = greedy_by_replica(cluster)
    assert len(by_replica) == 3 and all(outputs == pushed[0] for outputs in by_replica)

