"""The Serve push (serve/push.py) without Ray: two ingresses on one weight store and one
coordinator, a push whose lock lapsed while it ran (its process paused, or cut off from Redis), and
what GetStatus says while a replica still loads a committed version.

The replicas are a test double of the Serve handle (each broadcast answers as every replica
would); the push protocol, the weight store and the coordinator are the real ones."""

from __future__ import annotations

import asyncio
import zlib
from types import SimpleNamespace

import pytest
import torch

from rollout_service.errors import Conflict
from rollout_service.serve import push as push_module
from rollout_service.serve.backend import ServeBackend
from rollout_service.serve.coordinator import EmbeddedCoordinator
from rollout_service.serve.push import ClusterPush
from rollout_service.types import ApplyStats, Counters, ServerStatus
from rollout_service.weights.manifest import PushHeader, TensorSpec
from rollout_service.weights.versions import VersionStore

NAME = "model.norm.weight"


class ReplicaHandleDoubleForClusterPushTest:
    """Answers each broadcast as two healthy replicas would, and records the push's calls;
    `served` answers with the versions in `versions` (replica id -> version)."""

    def __init__(self):
        self.calls: list[tuple[str, tuple]] = []
        self.versions = {"r1": 0, "r2": 0}

    def options(self, **kwargs):
        return self

    def broadcast(self, method: str, *args):
        if method == "served":
            answers = [({"replica_id": r}, status(v)) for r, v in self.versions.items()]
        else:
            self.calls.append((method, args))
            answers = [{"prepare": 0.01, "apply": ApplyStats(), "abort": None}[method]] * 2

        async def results_async(return_exceptions: bool):
            return answers

        return SimpleNamespace(results_async=results_async)


def status(version: int) -> ServerStatus:
    return ServerStatus("tiny", "none", "bfloat16", version, 256, 2048, "processed", False, 64, "0", 1.0, Counters(), "drain")


def norm(value: float) -> bytes:
    return torch.full((256,), value, dtype=torch.bfloat16).view(torch.uint8).numpy().tobytes()


async def receive(ingress: ClusterPush, value: float, expected_version: int | None = None):
    """Begin a push of one tensor and receive it; `commit` commits it."""
    raw = norm(value)
    specs = (TensorSpec(NAME, "bfloat16", (256,), len(raw), zlib.crc32(raw)),)
    cm = ingress.begin(PushHeader(specs, expected_version=expected_version))
    session = await cm.__aenter__()
    await session.add_chunk(0, 0, raw)
    return cm, session


async def commit(ingress: ClusterPush, cm, session):
    """Commit a push `receive` began, and end it as `async with` would."""
    try:
        result = await ingress.commit(session)
    except BaseException as exc:
        await cm.__aexit__(type(exc), exc, exc.__traceback__)
        raise
    await cm.__aexit__(None, None, None)
    return result


@pytest.fixture
def deployment(tiny_model, tmp_path, monkeypatch):
    """Two ingresses sharing a coordinator and a store, with a push lock that lapses in 0.3 s."""
    monkeypatch.setattr(push_module, "LOCK_TTL_S", 0.3)
    config = SimpleNamespace(model=tiny_model, dtype="bfloat16", inflight="drain", push_buffer_mib=1)
    coordinator = EmbeddedCoordinator()
    replicas = ReplicaHandleDoubleForClusterPushTest()
    ingresses = [ClusterPush(config, replicas, coordinator, VersionStore(tmp_path / "store", keep=3)) for _ in range(2)]
    return SimpleNamespace(
        config=config, ingresses=ingresses, replicas=replicas, store=VersionStore(tmp_path / "store", keep=3)
    )


async def test_a_push_that_stalled_past_its_lock_commits_nothing(deployment, monkeypatch):
    """Ingress A stalls after receiving (no renewals: a paused process) and even after its last
    lock check: B takes the lock and commits version 1. A's commit is refused by the store, whose
    current version B committed under a newer fencing token; B's version and tensors stand."""
    stalled, fresh = deployment.ingresses

    async def paused(owner):  # no renewals while "paused"
        await asyncio.Event().wait()

    monkeypatch.setattr(stalled, "_keep_lock", paused)
    cm_a, session_a = await receive(stalled, 1.0)
    await asyncio.sleep(0.5)  # A's lock lapses

    cm_b, session_b = await receive(fresh, 2.0)
    assert (await commit(fresh, cm_b, session_b)).version == 1
    committed = deployment.store.current()

    async def passed(owner):  # A stalled right after its last lock check, so it passed it
        return None

    monkeypatch.setattr(stalled, "_fence", passed)
    with pytest.raises(Conflict, match=r"fencing token 1\) is older than the one version 1 was committed under \(2\)"):
        await commit(stalled, cm_a, session_a)
    assert deployment.store.current_version() == 1 and deployment.store.current() == committed
    deployment.store.verify(committed)
    assert [m for m, _ in deployment.replicas.calls] == ["prepare", "apply", "prepare", "abort"]
    assert sorted(d.name.split("-")[0] for d in deployment.store.root.glob("v*")) == ["v000001", "v000001"]
    assert list(deployment.store.incoming.iterdir()) == []


async def test_a_push_whose_lock_lapsed_is_refused_at_its_lock_check(deployment, monkeypatch):
    stalled, fresh = deployment.ingresses

    async def paused(owner):
        await asyncio.Event().wait()

    monkeypatch.setattr(stalled, "_keep_lock", paused)
    cm_a, session_a = await receive(stalled, 1.0)
    await asyncio.sleep(0.5)
    cm_b, _ = await receive(fresh, 2.0)  # B holds the lock now, and has not committed
    with pytest.raises(Conflict, match="lost the push lock before its commit"):
        await commit(stalled, cm_a, session_a)
    await cm_b.__aexit__(None, None, None)
    assert deployment.store.current_version() == 0 and not list(deployment.store.root.glob("v*"))


async def test_status_names_the_committed_version_a_trainer_may_fence_on_while_a_replica_loads_it(deployment):
    """GetStatus's weight_version is what every replica serves (the minimum); committed_version is
    what expected_version is compared with, so a trainer reading it is not refused meanwhile."""
    ingress = deployment.ingresses[0]
    assert (await commit(ingress, *await receive(ingress, 1.0))).version == 1
    deployment.replicas.versions = {"r1": 1, "r2": 0}  # r2 failed to load it and is catching up
    served = await ServeBackend(deployment.config, deployment.replicas, ingress).status()
    assert (served.weight_version, served.committed_version) == (0, 1)
    assert served.replica_versions == {"r1": 1, "r2": 0}
    fenced = await receive(ingress, 2.0, expected_version=served.committed_version)
    assert (await commit(ingress, *fenced)).version == 2


def test_a_replica_dying_during_a_call_is_unavailable_to_the_client():
    """Ray reports a replica process that died during a call (SIGKILL, OOM) as ActorDiedError;
    the client must get UNAVAILABLE (retry: Serve replaces the replica), not INTERNAL."""
    from ray.exceptions import ActorDiedError

    from rollout_service.errors import EngineUnavailable, grpc_status
    from rollout_service.serve.errors import unwrap

    mapped = unwrap(ActorDiedError())
    assert isinstance(mapped, EngineUnavailable) and grpc_status(mapped).name == "UNAVAILABLE"
    assert "an engine replica died during the call (ActorDiedError)" in str(mapped)
