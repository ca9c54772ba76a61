"""The push protocol (serve/push.py) with two replicas and two ingresses, without Ray: two
ingresses on one weight store and one coordinator, a push whose lock lapsed while it ran (its
process paused, or cut off from Redis), and what GetStatus says while a replica still loads a
committed version.

The replicas are a test double of the replica set (each broadcast answers as every replica
would); the push protocol, the weight store and the coordinator are the real ones."""

from __future__ import annotations

import asyncio
import threading
import zlib
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from rollout_service.errors import Conflict
from rollout_service.quant import Recipe
from rollout_service.serve import push as push_module
from rollout_service.serve.backend import Backend
from rollout_service.serve.coordinator import EmbeddedCoordinator
from rollout_service.serve.push import Push
from rollout_service.types import ApplyStats, Counters, ServerStatus
from rollout_service.weights.engine_format import to_engine_format
from rollout_service.weights.manifest import ParamTable, PushHeader, TensorSpec
from rollout_service.weights.versions import VersionStore

NAME = "model.norm.weight"


class ReplicasDoubleForPushTest:
    """The replica set (serve/replicas.py) of two healthy replicas: answers each broadcast as both
    would, and records the push's calls; `served` answers with the versions in `versions`
    (replica id -> version)."""

    def __init__(self):
        self.calls: list[tuple[str, tuple]] = []
        self.versions = {"r1": 0, "r2": 0}

    async def broadcast(self, method: str, *args):
        if method == "served":
            return [({"replica_id": r}, status(v)) for r, v in self.versions.items()]
        self.calls.append((method, args))
        return [{"take": None, "prepare": 0.01, "apply": ApplyStats(), "abort": None}[method]] * 2

    async def locate(self):
        pass

    def share(self, part):
        return part  # as the single-process server's replica set hands a part: its file


def status(version: int) -> ServerStatus:
    return ServerStatus("tiny", "none", "bfloat16", version, 256, 2048, "processed", False, 64, "0", 1.0, Counters(), "drain")


def norm(value: float) -> bytes:
    return torch.full((256,), value, dtype=torch.bfloat16).view(torch.uint8).numpy().tobytes()


def given(header: PushHeader):
    """A header reader (what the front ends hand begin) of an already parsed header."""

    async def read() -> PushHeader:
        return header

    return read


async def receive(ingress: Push, value: float, expected_version: int | None = None):
    """Begin a push of one tensor and receive it; `commit` commits it."""
    raw = norm(value)
    specs = (TensorSpec(NAME, "bfloat16", (256,), len(raw), zlib.crc32(raw)),)
    cm = ingress.begin(given(PushHeader(specs, expected_version=expected_version)))
    session = await cm.__aenter__()
    await session.add_chunk(0, 0, raw)
    return cm, session


async def commit(ingress: Push, cm, session):
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
    config = SimpleNamespace(
        model=tiny_model, dtype="bfloat16", inflight="drain", push_buffer_mib=1, recipe=lambda: None, staging_root=tmp_path / "staging"
    )
    coordinator = EmbeddedCoordinator()
    replicas = ReplicasDoubleForPushTest()
    ingresses = [Push(config, replicas, coordinator, VersionStore(tmp_path / "store", keep=3), ParamTable.from_checkpoint(tiny_model)) for _ in range(2)]
    return SimpleNamespace(
        config=config, ingresses=ingresses, replicas=replicas, store=VersionStore(tmp_path / "store", keep=3)
    )


async def paused(owner):
    """A paused process's lock keeper: it renews nothing."""
    await asyncio.Event().wait()


async def test_a_push_stalled_between_its_lock_check_and_its_commit_commits_nothing(deployment, monkeypatch):
    """Ingress A passes its last lock check, then stalls (a paused process) before it writes its
    commit; its lock lapses and ingress B begins a push. A's commit is refused by the store (B's
    fencing token is newer) although B has not committed; B then commits version 1."""
    stalled, fresh = deployment.ingresses
    at_commit, resume = threading.Event(), threading.Event()
    real_commit, real_refresh = stalled.store.commit, stalled.coordinator.refresh

    def stalls(*args):  # on a thread (asyncio.to_thread): A has passed its lock check
        at_commit.set()
        resume.wait(60)
        return real_commit(*args)

    async def refresh(owner, ttl_s):  # once A stalls, nothing renews its lock
        return False if at_commit.is_set() and owner == a_owner else await real_refresh(owner, ttl_s)

    monkeypatch.setattr(stalled.store, "commit", stalls)
    monkeypatch.setattr(stalled.coordinator, "refresh", refresh)
    cm_a, session_a = await receive(stalled, 1.0)
    a_owner = stalled._claims[session_a].owner
    committing = asyncio.create_task(commit(stalled, cm_a, session_a))
    assert await asyncio.to_thread(at_commit.wait, 60)
    began = []

    async def b_began() -> bool:  # once A's lock has lapsed
        try:
            began.append(await receive(fresh, 2.0))
            return True
        except Conflict:
            await asyncio.sleep(0.05)
            return False

    while not await b_began():
        pass
    resume.set()
    with pytest.raises(Conflict, match=r"fencing token 1\) lapsed while it ran and a newer push \(token 2\) has begun"):
        await committing
    assert (await commit(fresh, *began[0])).version == 1
    committed = deployment.store.current()
    deployment.store.verify(committed)
    assert committed.fence == 2
    assert load_file(deployment.store.root / committed.tensors[NAME].file)[NAME].view(torch.uint8).numpy().tobytes() == norm(2.0)
    assert [m for m, _ in deployment.replicas.calls] == ["take", "prepare", "abort", "take", "prepare", "apply"]
    assert sorted(d.name.split("-")[0] for d in deployment.store.root.glob("v*")) == ["v000001", "v000001"]
    assert list(deployment.store.incoming.iterdir()) == []


async def test_a_push_whose_lock_lapsed_is_refused_at_its_lock_check(deployment, monkeypatch):
    stalled, fresh = deployment.ingresses
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
    served = await Backend(deployment.config, deployment.replicas, ingress).status()
    assert (served.weight_version, served.committed_version) == (0, 1)
    assert served.replica_versions == {"r1": 1, "r2": 0}
    fenced = await receive(ingress, 2.0, expected_version=served.committed_version)
    assert (await commit(ingress, *fenced)).version == 2


async def test_int8_replicas_are_handed_each_tensor_requantized_once_by_the_ingress(deployment):
    """For int8/fp8 replicas the ingress requantizes each tensor as it arrives and every replica's
    prepare is given those parts (the replicas take them as they are written: serve/fanout.py): what they get
    is bitwise what requantizing the stored bf16 tensor gives, and the ingress keeps nothing after."""
    recipe = Recipe(fn="int8", source="default rule")
    deployment.config.recipe = lambda: recipe
    ingress = Push(deployment.config, deployment.replicas, EmbeddedCoordinator(), deployment.store, ParamTable.from_checkpoint(deployment.config.model))
    name = "model.layers.0.mlp.down_proj.weight"
    shape = ingress.table.shapes[name]
    tensor = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    raw = tensor.view(torch.uint8).numpy().tobytes()
    handed: list[dict[str, torch.Tensor]] = []
    real_broadcast = deployment.replicas.broadcast

    def broadcast(method, *args):  # read the parts while the replicas would take them
        if method == "take":
            _, _, fingerprint, _, source, names = args
            assert fingerprint == recipe.fingerprint()  # replicas of another recipe load the stored version
            handed.append({n: load_file(source)[n] for n in names})
        return real_broadcast(method, *args)

    deployment.replicas.broadcast = broadcast
    async with ingress.begin(given(PushHeader((TensorSpec(name, "bfloat16", shape, len(raw), zlib.crc32(raw)),)))) as session:
        await session.add_chunk(0, 0, raw)
        result = await ingress.commit(session)
    expected = to_engine_format(name, tensor, torch.bfloat16, recipe)
    assert result.version == 1 and list(handed[0]) == [name, name + "_scale"] and handed[0][name].dtype == torch.int8
    assert all(torch.equal(handed[0][k], expected[k]) for k in expected)
    stored = deployment.store.current()
    assert torch.equal(load_file(deployment.store.root / stored.tensors[name].file)[name], tensor)  # the store keeps bf16
    assert list(deployment.store.incoming.iterdir()) == []


def test_a_replica_dying_during_a_call_is_unavailable_to_the_client():
    """Ray reports a replica process that died during a call (SIGKILL, OOM) as ActorDiedError;
    the client must get UNAVAILABLE (retry: Serve replaces the replica), not INTERNAL."""
    from ray.exceptions import ActorDiedError

    from rollout_service.errors import EngineUnavailable, grpc_status
    from rollout_service.serve.handle import unwrap

    mapped = unwrap(ActorDiedError())
    assert isinstance(mapped, EngineUnavailable) and grpc_status(mapped).name == "UNAVAILABLE"
    assert "an engine replica died during the call (ActorDiedError)" in str(mapped)
