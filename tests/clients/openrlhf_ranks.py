"""Two OpenRLHF actor ranks syncing into the service as the launcher's `broadcast_to_vllm` does.

    python -m tests.clients.openrlhf_ranks ADDRESS MODEL_DIR OUT.json

Each rank joins a gloo group and holds the whole model (as under DeepSpeed ZeRO-1/2, where every
rank has full parameters), negates the final norm's weight (one optimizer step's worth of change),
builds the gloo group the launcher's actor builds, and calls `push_actor` on its
`transformers` model. OUT.json gets each rank's returned version (or error).
"""

from __future__ import annotations

import faulthandler
import json
import socket
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _rank_main(rank: int, port: int, address: str, model_dir: str, out: str) -> None:
    faulthandler.dump_traceback_later(300, exit=True)  # a hung rank says where it waits
    from transformers import AutoModelForCausalLM

    from rollout_client.integrations import lockstep
    from rollout_client.integrations.connection import Connection
    from rollout_client.integrations.openrlhf_train import push_actor

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    with torch.no_grad():
        model.model.norm.weight.neg_()
    group = lockstep.gloo_group()
    try:
        result = push_actor(model, Connection(address, timeout=120), group, label="openrlhf sync 1", expected_version=None)
        report = {"version": result.version, "tensors": result.tensors_applied}
    except Exception as exc:
        report = {"error": f"{type(exc).__name__}: {exc}"}
    with open(f"{out}.{rank}", "w") as f:
        json.dump(report, f)
    dist.destroy_process_group()


def main() -> None:
    address, model_dir, out = sys.argv[1:4]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank_main, args=(port, address, model_dir, out), nprocs=2)
    with open(out, "w") as f:
        json.dump({rank: json.load(open(f"{out}.{rank}")) for rank in range(2)}, f)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
