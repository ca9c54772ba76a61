"""The weight store on S3 (a real moto server, tests/s3.py): versions committed, kept, read back
and checked; the commit's compare-and-set on CURRENT against racing pushes and newer fencing
tokens; a store reopened on the same URL; refusals at open that name the URL."""

from __future__ import annotations

import threading

import boto3
import pytest
import torch
from safetensors.torch import load_file, save_file

from rollout_service.errors import ConfigError, Conflict, DataLoss
from rollout_service.weights.delta import DeltaBase
from rollout_service.weights.names import NameMap
from rollout_service.weights.object_store import ObjectVersionStore
from rollout_service.weights.versions import crc32_of
from tests.weights.test_versions import push, received, t


@pytest.fixture
def url(s3_server) -> str:
    return f"s3://{s3_server.new_bucket()}/weights"


def store_at(url: str, tmp_path, keep: int = 3) -> ObjectVersionStore:
    return ObjectVersionStore(url, keep, tmp_path / "local")


def objects(url: str) -> list[str]:
    bucket, prefix = url[len("s3://"):].split("/", 1)
    listed = boto3.client("s3").list_objects_v2(Bucket=bucket, Prefix=prefix + "/")
    return sorted(o["Key"][len(prefix) + 1:] for o in listed.get("Contents", []))


def test_versions_commit_overlay_and_only_the_last_k_are_kept_on_s3(url, tmp_path):
    store = store_at(url, tmp_path, keep=2)
    push(store, {"a.weight": t(1), "b.weight": t(1)}, "step-1")  # a stays referenced by every later manifest
    for v in range(2, 5):
        m = push(store, {"b.weight": t(v)}, f"step-{v}")
    assert store.current_version() == 4 and store.current() == m and m.label == "step-4"
    assert [k.version for k in store.kept()] == [4, 3]
    dirs = {key.split("/")[0] for key in objects(url)} - {"CURRENT"}
    assert sorted(d.split("-")[0] for d in dirs) == ["v000001", "v000003", "v000003", "v000004", "v000004"]
    assert "v000001/manifest.json" not in objects(url)  # v1: its tensors only
    assert not list((store.local).glob("v000002-*"))  # this machine's copies go with their version


def test_a_new_store_on_the_same_url_resumes_at_the_committed_version_and_reads_it(url, tmp_path):
    first = store_at(url, tmp_path / "a")
    push(first, {"a.weight": t(1), "b.weight": t(2)})
    push(first, {"b.weight": t(3)}, fence=7)
    first.close()

    again = store_at(url, tmp_path / "b")
    assert again.current_version() == 2 and again.fence_mark() == 7
    again.check()
    files = again.local_files(again.current(), tmp_path / "scratch")
    assert all(path.is_relative_to(tmp_path / "scratch") for path in files.values())
    loaded = {name: load_file(path)[name] for name, path in files.items()}
    assert torch.equal(loaded["a.weight"], t(1)) and torch.equal(loaded["b.weight"], t(3))


def test_of_two_stores_racing_to_commit_the_same_version_exactly_one_wins(url, tmp_path):
    stores = [store_at(url, tmp_path / "a"), store_at(url, tmp_path / "b")]
    for version in range(1, 6):
        candidates = [received(s, {"w": t(10 * version + i)}, version) for i, s in enumerate(stores)]
        start, outcomes = threading.Barrier(2), [None, None]

        def commit(i: int) -> None:
            start.wait()
            try:
                outcomes[i] = stores[i].commit(version, *candidates[i], f"from {i}")
            except Conflict as exc:
                outcomes[i] = exc

        threads = [threading.Thread(target=commit, args=(i,)) for i in range(2)]
        [th.start() for th in threads]
        [th.join() for th in threads]
        won = [i for i, o in enumerate(outcomes) if not isinstance(o, Conflict)]
        assert len(won) == 1, outcomes
        manifest = stores[1 - won[0]].current()  # as the loser reads it
        assert manifest.version == version and manifest.label == f"from {won[0]}"
        lost = 1 - won[0]
        assert stores[won[0]].holds(version, candidates[won[0]][0]) and not stores[lost].holds(version, candidates[lost][0])
        stores[1 - won[0]].discard(candidates[1 - won[0]][0])
    assert stores[0].current_version() == 5
    stores[0].verify(stores[0].current())


def test_a_commit_under_an_older_fencing_token_is_refused_once_a_newer_push_began(url, tmp_path):
    old, new = store_at(url, tmp_path / "a"), store_at(url, tmp_path / "b")
    old.raise_fence(5)
    files, crc = received(old, {"w": t(1)}, 1)
    new.raise_fence(6)  # a newer push began, on another ingress: its token is in CURRENT now
    with pytest.raises(Conflict, match="fencing token 5"):
        old.commit(1, files, crc, "lapsed", fence=5)
    assert old.current_version() == 0 and old.fence_mark() == 6
    new.raise_fence(4)  # never lowered
    assert push(new, {"w": t(2)}, fence=6).version == 1
    assert old.current_version() == 1 and old.fence_mark() == 6


def test_a_manifest_left_by_a_push_fenced_off_is_replaced_by_the_newer_push_and_cleaned(url, tmp_path):
    store = store_at(url, tmp_path)
    store.raise_fence(3)
    files, crc = received(store, {"w": t(1)}, 1)
    store._write_manifest(store._next(1, files, crc, "cut off", 3, None), files)  # a push killed before its commit point
    store.raise_fence(4)
    assert push(store, {"w": t(2)}, "newer", fence=4).label == "newer"
    assert store.current().label == "newer"
    files, crc = received(store, {"w": t(3)}, 2)
    store._write_manifest(store._next(2, files, crc, "never committed", 4, None), files)
    store.clean()
    assert [key for key in objects(url) if key.startswith("v000002")] == []


def test_a_shard_whose_bytes_changed_in_the_bucket_is_data_loss_naming_it(url, tmp_path):
    store = store_at(url, tmp_path / "a")
    m = push(store, {"a.weight": t(1), "b.weight": t(2)})
    key = m.tensors["b.weight"].file
    bucket, prefix = url[len("s3://"):].split("/", 1)
    s3 = boto3.client("s3")
    body = bytearray(s3.get_object(Bucket=bucket, Key=f"{prefix}/{key}")["Body"].read())
    body[-1] ^= 0xFF  # the last byte of the last tensor's data
    s3.put_object(Bucket=bucket, Key=f"{prefix}/{key}", Body=bytes(body))
    reader = store_at(url, tmp_path / "b")  # another machine: no copy of its own
    with pytest.raises(DataLoss, match=rf"{url}/{key}: b.weight has CRC-32"):
        reader.local_files(reader.current(), tmp_path / "scratch")


def test_a_missing_bucket_is_refused_at_open_naming_the_url(s3_server, tmp_path):
    with pytest.raises(ConfigError, match=r"weights_dir s3://no-such-bucket-[0-9a-f]+/w: the bucket does not exist"):
        store_at(f"s3://no-such-bucket-{s3_server.new_bucket()[-10:]}/w", tmp_path)


def test_an_unreachable_endpoint_is_refused_at_open_naming_the_url(s3_server, tmp_path, monkeypatch):
    from rollout_service.errors import StorageUnavailable
    from tests.s3 import free_port

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{free_port()}")
    with pytest.raises(StorageUnavailable, match=r"weights_dir s3://b/w: the object store cannot be reached"):
        store_at("s3://b/w", tmp_path)


def test_a_store_bound_to_one_checkpoint_is_refused_to_another(url, tmp_path):
    store_at(url, tmp_path).bind("aaaa", tmp_path)
    with pytest.raises(ConfigError, match=rf"weights_dir {url}: its versions were pushed onto"):
        store_at(url, tmp_path).bind("bbbb", tmp_path)


def test_a_delta_base_is_read_from_s3(url, tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    save_file({"model.norm.weight": torch.ones(4, dtype=torch.bfloat16)}, model / "model.safetensors")
    two = torch.full((4,), 2.0, dtype=torch.bfloat16)
    push(store_at(url, tmp_path / "a"), {"model.norm.weight": two})
    reader = store_at(url, tmp_path / "b")  # no copy of version 1 on this machine
    mapping = NameMap({"model.norm.weight": (4,)}, tied=False).resolve("model.norm.weight")
    base = DeltaBase(reader, 1, 1, model, "bfloat16")
    tensor, crc = base.read(mapping)
    assert torch.equal(tensor, two) and crc == crc32_of(two)
    scratch = base._scratch
    assert scratch.is_dir()
    del base
    assert not scratch.exists()  # the copies go with the base, at the end of the push


def test_store_verify_and_repair_refuse_an_object_store_naming_it(url):
    from typer.testing import CliRunner

    from rollout_service.cli import app

    for command in ("verify", "repair"):
        done = CliRunner().invoke(app, ["store", command, url], catch_exceptions=False)
        assert done.exit_code == 1 and f"{url} is an object store" in done.output


def test_the_local_copies_of_a_store_whose_process_died_are_removed_at_the_next_open(s3_server, tmp_path):
    """An ingress killed without closing its S3 store leaves its local copies; the next store
    opened under the same staging root removes them, never a live one's."""
    import subprocess
    import sys

    url = f"s3://{s3_server.new_bucket()}/w"
    live = ObjectVersionStore(url, 3, tmp_path)
    script = f"from pathlib import Path; from rollout_service.weights.object_store import ObjectVersionStore as S; S({url!r}, 3, Path({str(tmp_path)!r}))"
    subprocess.run([sys.executable, "-c", script], check=True)  # exits without close()
    assert len(list(tmp_path.glob("store-*"))) == 2
    again = ObjectVersionStore(url, 3, tmp_path)
    assert sorted(tmp_path.glob("store-*")) == sorted([live.local, again.local])
    live.close()
    again.close()
