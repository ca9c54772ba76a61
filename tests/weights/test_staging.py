"""Staged parts (weights/staging.py) taken over by another spool: a replica takes the parts the
ingress wrote as its own, hard-linked where it can, copied where it cannot, and written from their
bytes where they came as a Ray object; each part written is handed on as it is written."""

from __future__ import annotations

import errno
import os

import torch
from safetensors.torch import load_file

from rollout_service.weights.staging import ShardWriter


def _parts(root) -> ShardWriter:
    made = ShardWriter(root / "ingress", part_bytes=1)  # one part per tensor
    made.add({"a.weight": torch.ones(4, dtype=torch.int8), "a.weight_scale": torch.full((4, 1), 0.5)})
    made.add({"b.weight": torch.arange(6, dtype=torch.int8)})
    return made


def _take_all(replica: ShardWriter, source: ShardWriter, as_bytes: bool = False) -> None:
    for path in set(source.files.values()):
        names = [n for n, p in source.files.items() if p == path]
        replica.take(path.name, memoryview(path.read_bytes()) if as_bytes else path, names)


def test_a_spool_links_another_spools_parts_without_copying_them(tmp_path):
    source = _parts(tmp_path)
    replica = ShardWriter(tmp_path / "replica")
    _take_all(replica, source)
    assert set(replica.files) == {"a.weight", "a.weight_scale", "b.weight"}
    for name, path in replica.files.items():
        assert path.parent == replica.dir and os.path.samefile(path, source.files[name])
    source.discard()  # the ingress drops its parts once every replica has taken them
    assert torch.equal(load_file(replica.files["b.weight"])["b.weight"], torch.arange(6, dtype=torch.int8))


def test_across_filesystems_the_parts_are_copied(tmp_path, monkeypatch):
    source = _parts(tmp_path)

    def cross_device(src, dst):  # test double: the staging directory on another filesystem
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", cross_device)
    replica = ShardWriter(tmp_path / "replica")
    _take_all(replica, source)
    for name, path in replica.files.items():
        assert not os.path.samefile(path, source.files[name]) and path.read_bytes() == source.files[name].read_bytes()


def test_parts_taken_as_bytes_are_written_whole(tmp_path):
    source = _parts(tmp_path)
    replica = ShardWriter(tmp_path / "replica")
    _take_all(replica, source, as_bytes=True)
    for name, path in replica.files.items():
        assert path.parent == replica.dir and path.read_bytes() == source.files[name].read_bytes()


def test_each_part_is_handed_on_as_it_is_written(tmp_path):
    written: list[tuple[str, list[str]]] = []
    spool = ShardWriter(tmp_path, part_bytes=1, on_part=lambda path, names: written.append((path.name, names)))
    spool.add({"a.weight": torch.ones(4), "a.bias": torch.ones(4)})
    spool.add({"b.weight": torch.ones(2)})
    spool.flush()  # nothing pending: no empty part
    assert written == [("part-00000.safetensors", ["a.weight", "a.bias"]), ("part-00001.safetensors", ["b.weight"])]
