"""load_weights throughput from an S3 server (moto on loopback) and from a local directory, against
reading the same files with safetensors alone, measured side by side in one run.

The bench model's bf16 weights are written once as a Hugging Face sharded checkpoint (2 files and
their index) into a bucket of a moto server and into a directory the server may load from
(--load-dirs); then, interleaved round by round:
  load s3          client.load_weights("s3://...") into a running bf16 `rollout-service serve`:
                   ranged reads, checks, cast, stage, commit, apply, version flip -- the whole call;
  load dir         the same from the directory (the files in the page cache after the first round);
  safetensors s3   the same objects fetched whole (s3fs) and parsed by safetensors.torch.load;
  safetensors dir  safetensors.torch.load_file of each shard.
GB/s are the checkpoint's tensor bytes over the wall time; the loads' server-side receive time
(reading and converting, before the commit) is reported beside them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import CACHE, emit, machine, quiet  # noqa: E402
from bench.push import bench_model  # noqa: E402


def write_sharded(model: Path, out: Path, shards: int = 2) -> list[Path]:
    """The model's weights as `shards` safetensors files and their index in `out`."""
    from safetensors.torch import load_file, save_file

    weights = load_file(model / "model.safetensors")
    names = sorted(weights)
    out.mkdir(parents=True, exist_ok=True)
    weight_map, files = {}, []
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: weights[n] for n in names[i::shards]}
        save_file(part, out / file, metadata={"format": "pt"})
        weight_map.update({n: file for n in part})
        files.append(out / file)
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return files


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the ~50 MB bench model, 2 rounds (else ~0.5 GB, 3 rounds)")
    parser.add_argument("--json", action="store_true", help="only the JSON line")
    args = parser.parse_args()
    rounds = 2 if args.quick else 3

    import boto3
    import fsspec
    from safetensors.torch import load, load_file

    from rollout_client import RolloutClient
    from rollout_service.launcher import ServerProcess
    from tests.s3 import start_s3

    model = bench_model(args.quick)
    root = CACHE / "load-bench"
    folder = root / model.name
    files = write_sharded(model, folder)
    nbytes = sum(t.numel() * t.element_size() for f in files for t in load_file(f).values())
    s3 = start_s3()
    server = None
    try:
        bucket = s3.new_bucket()
        client_s3 = boto3.client("s3", endpoint_url=s3.endpoint)
        for f in folder.iterdir():
            client_s3.upload_file(str(f), bucket, f"{model.name}/{f.name}")
        url = f"s3://{bucket}/{model.name}/"
        server = ServerProcess.start(
            model, CACHE / "load-bench-server.log", "--backend", "local", "--max-model-len", "256", "--no-http",
            "--load-dirs", str(root),
        )
        fs = fsspec.filesystem("s3", skip_instance_cache=True)
        keys = [f"{bucket}/{model.name}/{f.name}" for f in files]
        times: dict[str, list[float]] = {"load_s3": [], "load_dir": [], "safetensors_s3": [], "safetensors_dir": []}
        receive: dict[str, list[float]] = {"load_s3": [], "load_dir": []}
        with RolloutClient(server.grpc_address, timeout=600) as client:
            for _ in range(rounds):
                for name, source in (("load_s3", url), ("load_dir", str(folder))):
                    quiet()
                    start = time.perf_counter()
                    result = client.load_weights(source)
                    times[name].append(time.perf_counter() - start)
                    receive[name].append(result.receive_s)
                start = time.perf_counter()
                for key in keys:
                    load(fs.cat_file(key))
                times["safetensors_s3"].append(time.perf_counter() - start)
                start = time.perf_counter()
                for f in files:
                    load_file(f)
                times["safetensors_dir"].append(time.perf_counter() - start)
    finally:
        if server is not None:
            server.stop()
        s3.stop()
    result = {f"{k}_gbps": round(nbytes / statistics.median(v) / 1e9, 3) for k, v in times.items()}
    result |= {f"{k}_receive_gbps": round(nbytes / statistics.median(v) / 1e9, 3) for k, v in receive.items()}
    result |= {"checkpoint_bytes": nbytes, "files": len(files), "rounds": rounds, "model": model.name, "machine": machine()}
    if not args.json:
        for k, v in result.items():
            print(f"{k:28s} {v}")
    emit(result)


if __name__ == "__main__":
    main()
