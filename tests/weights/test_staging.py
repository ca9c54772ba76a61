"""Staged parts (weights/staging.py) taken over by another spool: a Ray Serve replica takes the
parts the ingress requantized as its own, hard-linked where it can and copied where it cannot."""

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


def test_a_spool_links_another_spools_parts_without_copying_them(tmp_path):
    source = _parts(tmp_path)
    replica = ShardWriter(tmp_path / "replica")
    replica.link(source.files)
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
    replica.link(source.files)
    for name, path in replica.files.items():
        assert not os.path.samefile(path, source.files[name]) and path.read_bytes() == source.files[name].read_bytes()
