"""Two OpenRLHF actor ranks syncing into the service as the launcher's `broadcast_to_vllm` does.

    python -m tests.clients.openrlhf_ranks ADDRESS MODEL_DIR OUT.json

Each rank joins a gloo group and holds the whole model (as under DeepSpeed ZeRO-1/2, where every
rank has full parameters), builds the gloo group and rank 0's client as the launcher's actor does,
and syncs twice with `push_actor`: the model as loaded with its final norm's weight negated (the
first sync goes whole), then with the norm negated back, fenced on the first (a delta). OUT.json
gets each rank's versions and the second sync's delta tensors (or the error).
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
    from rollout_client.integrations.openrlhf_train import push_actor, push_client

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    with torch.no_grad():
        model.model.norm.weight.neg_()
    group = lockstep.gloo_group()
    client = push_client(Connection(address, timeout=120))
    try:
        first = push_actor(model, client, group, label="openrlhf sync 0", expected_version=None)
        with torch.no_grad():
            model.model.norm.weight.neg_()
        second = push_actor(model, client, group, label="openrlhf sync 1", expected_version=first.version)
        report = {"versions": [first.version, second.version], "tensors": second.tensors_applied, "deltas": second.delta_tensors}
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
