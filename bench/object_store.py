"""Object-store weight store (issue 33): S3 client libraries compared on a local moto server, and the
store's own paths on S3 against a local directory.

1. s3fs, pyarrow.fs.S3FileSystem and obstore writing and reading one 64 MiB object (MB/s, median
   of the runs), and whether each can make a conditional write (create-only, and If-Match an ETag:
   what the store's compare-and-set commit needs), tried on the server.
2. On a checkpoint-shaped set of random bf16 tensors (~587 MB, one run each, no engine):
   (a) store write: one version committed (spool -> adopt -> commit) into the store on S3 and into a
       local directory;
   (b) late-replica catch-up read: `local_files` on a store that did not push it (S3: every shard
       downloaded and its CRC-32s checked; local: the shards checked in place).

moto keeps objects in memory and serves them from one Python process on this machine: the figures
compare the clients' overheads and the store's paths, not a real S3's bandwidth.

    python bench/object_store.py [--quick] [--json]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import emit, machine  # noqa: E402

OBJECT_BYTES = 64 << 20


def start_moto():
    """moto's server on a free loopback port, its credentials and endpoint in os.environ."""
    from tests.s3 import start_s3

    return start_s3()


# ---- 1. client libraries ----------------------------------------------------------------------


def s3fs_client(endpoint: str, bucket: str):
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True)

    def put(key, data, **condition):
        return fs.pipe_file(f"{bucket}/{key}", data, **condition)["ETag"]

    def get(key):
        return fs.cat_file(f"{bucket}/{key}")

    def conditional(key):
        etag = put(key, b"1", mode="create")
        return _refused(lambda: put(key, b"2", mode="create")) and _refused(lambda: put(key, b"3", IfMatch='"0"')) and bool(
            put(key, b"4", IfMatch=etag)
        )

    return put, get, conditional


def pyarrow_client(endpoint: str, bucket: str):
    from pyarrow import fs as pafs

    host = endpoint.split("://", 1)[1]
    fs = pafs.S3FileSystem(
        access_key=os.environ["AWS_ACCESS_KEY_ID"], secret_key=os.environ["AWS_SECRET_ACCESS_KEY"],
        region=os.environ["AWS_DEFAULT_REGION"], endpoint_override=host, scheme="http",
    )

    def put(key, data):
        with fs.open_output_stream(f"{bucket}/{key}") as out:
            out.write(data)

    def get(key):
        with fs.open_input_stream(f"{bucket}/{key}") as f:
            return f.read()

    def conditional(key):
        return False  # pyarrow.fs has no conditional write: open_output_stream always overwrites

    return put, get, conditional


def obstore_client(endpoint: str, bucket: str):
    import obstore
    from obstore.store import S3Store

    store = S3Store(
        bucket, endpoint=endpoint, allow_http=True, region=os.environ["AWS_DEFAULT_REGION"],
        access_key_id=os.environ["AWS_ACCESS_KEY_ID"], secret_access_key=os.environ["AWS_SECRET_ACCESS_KEY"],
    )

    def put(key, data, **mode):
        return obstore.put(store, key, data, **mode)

    def get(key):
        return obstore.get(store, key).bytes()

    def conditional(key):
        first = put(key, b"1", mode="create")
        return (
            _refused(lambda: put(key, b"2", mode="create"))
            and _refused(lambda: put(key, b"3", mode={"e_tag": '"0"'}))
            and bool(put(key, b"4", mode={"e_tag": first["e_tag"]}))
        )

    return put, get, conditional


def _refused(write) -> bool:
    try:
        write()
    except Exception:
        return True
    return False


def compare_clients(s3, runs: int) -> list[dict]:
    data = os.urandom(OBJECT_BYTES)
    rows = []
    for name, make in (("s3fs", s3fs_client), ("pyarrow.fs", pyarrow_client), ("obstore", obstore_client)):
        bucket = s3.new_bucket("bench")
        put, get, conditional = make(s3.endpoint, bucket)
        writes, reads = [], []
        for i in range(runs):
            start = time.perf_counter()
            put(f"obj-{i}", data)
            writes.append(OBJECT_BYTES / 1e6 / (time.perf_counter() - start))
            start = time.perf_counter()
            back = get(f"obj-{i}")
            reads.append(OBJECT_BYTES / 1e6 / (time.perf_counter() - start))
            assert len(back) == OBJECT_BYTES
        try:
            cas = conditional("cas")
        except Exception as exc:  # noqa: BLE001 - reported as the library's answer
            cas = f"error: {exc}"
        rows.append({
            "library": name, "write_MBps": round(statistics.median(writes), 1), "read_MBps": round(statistics.median(reads), 1),
            "write_runs": [round(w, 1) for w in writes], "read_runs": [round(r, 1) for r in reads], "conditional_writes": cas,
        })
        print(f"{name}: write {rows[-1]['write_MBps']} MB/s, read {rows[-1]['read_MBps']} MB/s, conditional {cas}", file=sys.stderr)
    return rows


# ---- 2. the store on S3 against a local directory ---------------------------------------------


def checkpoint_tensors(quick: bool) -> dict:
    """Random bf16 tensors shaped like a 6-layer, hidden-2048 checkpoint (~587 MB; --quick: ~50 MB)."""
    import torch

    layers, hidden, inter, vocab = (2, 1024, 2816, 4096) if quick else (6, 2048, 5632, 11264)
    kv = hidden // 4
    g = torch.Generator().manual_seed(0)
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": (hidden, hidden), p + "self_attn.k_proj.weight": (kv, hidden),
            p + "self_attn.v_proj.weight": (kv, hidden), p + "self_attn.o_proj.weight": (hidden, hidden),
            p + "mlp.gate_proj.weight": (inter, hidden), p + "mlp.up_proj.weight": (inter, hidden),
            p + "mlp.down_proj.weight": (hidden, inter),
        }
    return {n: torch.randn(s, generator=g).to(torch.bfloat16) for n, s in shapes.items()}


def commit_version(store, tensors: dict) -> float:
    """Seconds to commit `tensors` as the next version: spool (written and CRC'd as a push's
    conversion thread does), adopt, commit."""
    from rollout_service.weights.versions import crc32_of

    start = time.perf_counter()
    spool = store.spool()
    for name, t in tensors.items():
        spool.add({name: t})
    spool.flush()
    crc = {n: crc32_of(t) for n, t in tensors.items()}
    version = store.current_version() + 1
    files = store.adopt(spool.dir, spool.files, version)
    store.commit(version, files, crc, "bench")
    return time.perf_counter() - start


def compare_store(s3, quick: bool, work: Path) -> dict:
    from rollout_service.weights.object_store import ObjectVersionStore
    from rollout_service.weights.versions import VersionStore

    tensors = checkpoint_tensors(quick)
    nbytes = sum(t.nbytes for t in tensors.values())
    url = f"s3://{s3.new_bucket('store')}/weights"
    stores = {"s3": ObjectVersionStore(url, 3, work / "s3-local"), "local": VersionStore(work / "dir", 3)}
    write = {name: commit_version(store, tensors) for name, store in stores.items()}
    # A late replica: a store of its own on the same URL / directory, with no copy of the version.
    readers = {"s3": ObjectVersionStore(url, 3, work / "s3-reader"), "local": VersionStore(work / "dir", 3)}
    read = {}
    for name, store in readers.items():
        start = time.perf_counter()
        store.local_files(store.current(), work / f"scratch-{name}-{uuid.uuid4().hex[:6]}")
        read[name] = time.perf_counter() - start
    for store in (*stores.values(), *readers.values()):
        store.close()
    result = {"model_MB": round(nbytes / 1e6), "tensors": len(tensors)}
    for name in stores:
        result[f"write_{name}_s"] = round(write[name], 2)
        result[f"write_{name}_MBps"] = round(nbytes / 1e6 / write[name], 1)
        result[f"catchup_{name}_s"] = round(read[name], 2)
        result[f"catchup_{name}_MBps"] = round(nbytes / 1e6 / read[name], 1)
    print(f"store: {result}", file=sys.stderr)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 runs per library, a ~50 MB model (about a minute)")
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = parser.parse_args()
    import logging

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's request log
    s3 = start_moto()
    try:
        with tempfile.TemporaryDirectory(prefix="bench-object-store-") as work:
            clients = compare_clients(s3, 2 if args.quick else 5)
            store = compare_store(s3, args.quick, Path(work))
    finally:
        s3.stop()
    result = {"bench": "object_store", "machine": machine(), "quick": args.quick, "object_MiB": OBJECT_BYTES >> 20,
              "clients": clients, "store": store}
    if args.json:
        emit(result)
    else:
        for row in clients:
            print(f"{row['library']:>11}: write {row['write_MBps']:>7} MB/s  read {row['read_MBps']:>7} MB/s  conditional writes: {row['conditional_writes']}")
        print(store)


if __name__ == "__main__":
    main()
