"""Two trainer ranks syncing weights as verl's engine workers do (Test B of the verl plugin).

    python -m tests.clients.verl_ranks ADDRESS WEIGHTS.safetensors GLOBAL_STEPS OUT.json [BUCKET_MB]

Each rank joins a gloo group, holds its shard of every tensor (a DTensor sharded on dim 0, as
FSDP holds parameters), and calls the plugin's `update_weights` with a generator whose every step
is `full_tensor()`, a collective all-gather: exactly verl's `get_per_tensor_param` generator and
its `rollout.update_weights(generator, peft_config=None, base_sync_done=True, global_steps=N)`
call, on every rank. OUT.json gets each rank's returned version (or error) and how many tensors
its generator yielded (BUCKET_MB: verl's update_weights_bucket_megabytes, default 2048).
"""

from __future__ import annotations

import asyncio
import faulthandler
import json
import socket
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _rank_main(rank: int, port: int, address: str, weights_path: str, steps: int, out: str, bucket_mb: int) -> None:
    faulthandler.dump_traceback_later(300, exit=True)  # a hung rank says where it waits
    from safetensors.torch import load_file
    from torch.distributed.tensor import Shard, distribute_tensor
    from torch.distributed.device_mesh import init_device_mesh
    from verl.workers.config import RolloutConfig
    from verl.workers.config.rollout import CheckpointEngineConfig

    from rollout_client.integrations.verl import RolloutServiceRollout

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    mesh = init_device_mesh("cpu", (2,))
    sharded = {k: distribute_tensor(v, mesh, [Shard(0)]) for k, v in load_file(weights_path).items()}
    yielded = 0

    def per_tensor_param():
        nonlocal yielded
        for name, param in sharded.items():
            yielded += 1
            yield name, param.full_tensor()

    config = RolloutConfig(
        name="rollout_service", custom={"address": address},
        checkpoint_engine=CheckpointEngineConfig(update_weights_bucket_megabytes=bucket_mb),
    )
    rollout = RolloutServiceRollout(config, None, None)
    try:
        result = asyncio.run(rollout.update_weights(per_tensor_param(), peft_config=None, base_sync_done=True, global_steps=steps))
        report = {"version": result.version, "yielded": yielded}
    except Exception as exc:
        report = {"error": f"{type(exc).__name__}: {exc}", "yielded": yielded}
    dist.barrier()  # as verl's update_weights does after the sync
    with open(f"{out}.{rank}", "w") as f:
        json.dump(report, f)
    dist.destroy_process_group()


def main() -> None:
    address, weights_path, steps, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    bucket_mb = int(sys.argv[5]) if len(sys.argv) > 5 else 2048
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank_main, args=(port, address, weights_path, steps, out, bucket_mb), nprocs=2)
    reports = {rank: json.load(open(f"{out}.{rank}")) for rank in range(2)}
    with open(out, "w") as f:
        json.dump(reports, f)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
