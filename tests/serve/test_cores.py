"""The default cores of CPU engine replicas: all the node's cores but one, as `vllm serve` binds
its engine, shared by the replicas that may run; the rest is said in the start log line."""

from __future__ import annotations

import pytest

from rollout_service.config import ServerConfig
from rollout_service.serve import app


@pytest.fixture
def cores(monkeypatch):
    def node_of(n: int) -> None:
        monkeypatch.setattr(app, "usable_cores", lambda: list(range(n)))
        monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)

    return node_of


@pytest.mark.parametrize("node, scaling, per", [
    (2, {}, 1), (16, {}, 15), (16, {"replicas": 2}, 7), (16, {"autoscale": (1, 4)}, 3), (4, {"replicas": 8}, 1),
])
def test_replicas_share_all_cores_but_one_by_default(cores, tiny_model, node, scaling, per):
    cores(node)
    assert app.cores_per_replica(ServerConfig(model=tiny_model, **scaling)) == per


def test_a_given_replica_cpus_or_a_gpu_replica_is_not_sized_from_the_node(cores, tiny_model):
    cores(16)
    assert app.cores_per_replica(ServerConfig(model=tiny_model, replica_cpus=2.5)) == 2.5
    assert app.cores_per_replica(ServerConfig(model=tiny_model, replica_gpus=1)) == 1.0


def test_the_start_line_says_which_cores_replicas_get_and_what_is_left(cores, tiny_model):
    cores(16)
    assert app.core_plan(ServerConfig(model=tiny_model, replicas=2)) == (
        "2 replica(s); model threads bound to cores 0,1,2,3,4,5,6 | 7,8,9,10,11,12,13; the ingress, the replicas' "
        "front ends and the engines' schedulers on cores 14,15; Ray's own processes on any"
    )


def test_the_replicas_get_the_default_resolved_where_their_count_is_known(cores, tiny_model):
    cores(16)
    args = app.app_config(ServerConfig(model=tiny_model, replicas=2))["args"]
    assert args["replica_cpus"] == 7 and "replicas" not in args  # scaling stays out of the arguments
    built = ServerConfig(**args)  # what a replica and the ingress get: no replica count
    assert app.engine_cores(built) == ([[0, 1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12, 13]], [14, 15])


def test_the_ingress_moves_every_thread_off_the_engines_cores(cores, tiny_model, monkeypatch):
    cores(4)
    moved = {}
    monkeypatch.setattr(app.os, "sched_setaffinity", lambda tid, mask: moved.__setitem__(tid, list(mask)))
    app.keep_off_engine_cores(ServerConfig(model=tiny_model, replicas=1))
    threads = {int(t) for t in app.os.listdir("/proc/self/task")}
    assert set(moved) == threads and all(mask == [3] for mask in moved.values())


def test_each_replica_binds_its_own_cores(cores, tiny_model):
    cores(16)
    bound = []
    for rank in (0, 1, 2):
        app.bind_cores(ServerConfig(model=tiny_model, replica_cpus=7), rank)
        bound.append(app.os.environ.pop("VLLM_CPU_OMP_THREADS_BIND"))
    assert bound == ["0,1,2,3,4,5,6", "7,8,9,10,11,12,13", "0,1,2,3,4,5,6"]  # a third shares the first's
