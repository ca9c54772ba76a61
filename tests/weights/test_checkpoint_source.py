"""CheckpointSource without an engine: what it reads of a local checkpoint, and what it refuses
before any tensor byte is read (the S3 side and the whole load are in test_load_weights.py)."""

from __future__ import annotations

import collections
import json

import pytest
import torch
from safetensors.torch import save_file

from rollout_service.errors import InvalidArgument, NotFound, PermissionDenied
from rollout_service.weights import checkpoint_source
from rollout_service.weights.checkpoint_source import CheckpointSource

WEIGHTS = {
    "a": torch.arange(15, dtype=torch.bfloat16).reshape(3, 5),
    "b": torch.arange(3000, dtype=torch.float32),
    "c": torch.ones(2, dtype=torch.float16),
}


def _sharded(folder):
    save_file({"a": WEIGHTS["a"], "b": WEIGHTS["b"]}, folder / "m-1.safetensors")
    save_file({"c": WEIGHTS["c"]}, folder / "m-2.safetensors")
    weight_map = {"a": "m-1.safetensors", "b": "m-1.safetensors", "c": "m-2.safetensors"}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return folder


def _read(source: CheckpointSource) -> dict[str, bytes]:
    got: dict[int, bytearray] = collections.defaultdict(bytearray)
    for index, offset, data in source.chunks():
        assert offset == len(got[index])
        got[index] += data
    return {t.name: bytes(got[i]) for i, t in enumerate(source.tensors)}


def test_a_sharded_checkpoint_reads_every_tensor_in_small_ranges(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint_source, "CHUNK_BYTES", 1000)  # tensors span several reads
    source = CheckpointSource.open(str(_sharded(tmp_path)), [tmp_path])
    assert {t.name: t.dtype for t in source.tensors} == {"a": "bfloat16", "b": "float32", "c": "float16"}
    assert _read(source) == {k: v.view(torch.uint8).numpy().tobytes() for k, v in WEIGHTS.items()}


def test_an_index_that_disagrees_with_a_files_header_is_refused_naming_both(tmp_path):
    _sharded(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "m-1.safetensors", "c": "m-2.safetensors"}}))
    with pytest.raises(InvalidArgument, match="m-1.safetensors: b: its header has it, the index does not"):
        CheckpointSource.open(str(tmp_path), [tmp_path])


@pytest.mark.parametrize(
    "url, error, message",
    [
        ("http://example.com/ckpt/", InvalidArgument, "scheme 'http' is not an object store"),
        ("s3://bucket/x::file:///etc", InvalidArgument, "chained URLs"),
        ("relative/dir", InvalidArgument, "must be absolute"),
        ("/etc", PermissionDenied, "load_dirs"),
        ("gs://bucket/ckpt/", InvalidArgument, "scheme 'gs' is not an object store"),
        ("s3://AKIAKEY:secret@bucket/ckpt/", InvalidArgument, "^url: credentials in the URL are not taken[^@]*$"),
        ("s3://other-bucket/step-1/", PermissionDenied, r"load_urls option: s3://rollout-ckpt/\)"),
        ("s3://rollout-ckpt-evil/step-1/", PermissionDenied, "load_urls"),  # a prefix is whole path segments
    ],
)
def test_urls_the_server_must_not_read_are_refused(tmp_path, url, error, message):
    with pytest.raises(error, match=message):
        CheckpointSource.open(url, [tmp_path], ["s3://rollout-ckpt/"])


def test_without_load_urls_no_object_store_url_is_read():
    with pytest.raises(PermissionDenied, match="its load_urls option is empty"):
        CheckpointSource.open("s3://bucket/step-1/", [])


def test_a_load_url_prefix_takes_whole_path_segments():
    from rollout_service.weights.checkpoint_source import under_prefix

    assert under_prefix("s3://b/step-1/", ["s3://b"]) and under_prefix("s3://b/x", ["s3://"])
    assert not under_prefix("s3://b2/step-1/", ["s3://b"]) and not under_prefix("s3://b/x", [])


def test_a_directory_without_a_checkpoint_is_not_found_naming_what_was_looked_for(tmp_path):
    with pytest.raises(NotFound, match="neither model.safetensors.index.json nor model.safetensors"):
        CheckpointSource.open(str(tmp_path), [tmp_path])


def test_an_index_naming_a_file_outside_its_directory_is_refused(tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "../secret.safetensors"}}))
    with pytest.raises(InvalidArgument, match="not a .safetensors file beside the index"):
        CheckpointSource.open(str(tmp_path), [tmp_path])
