"""A delta push's base, read from the weight store, and the rebuild of a delta tensor against it,
without an engine: what is refused, and with which error."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from rollout_client.delta import encode
from rollout_service.errors import DataLoss, DeltaBaseUnavailable, FailedPrecondition, InvalidArgument
from rollout_service.weights.delta import DeltaBase, rebuild
from rollout_service.weights.manifest import DeltaSpec, TensorSpec
from rollout_service.weights.names import NameMap
from rollout_service.weights.versions import VersionStore, crc32_of
from tests.weights.test_versions import push

NORM, Q = "model.norm.weight", "model.layers.0.self_attn.q_proj.weight"


@pytest.fixture
def checkpoint(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    save_file({NORM: torch.ones(4, dtype=torch.bfloat16), Q: torch.zeros(4, 4, dtype=torch.bfloat16)}, model / "model.safetensors")
    return model


def _mapping(name):
    return NameMap({NORM: (4,), Q: (4, 4)}, tied=False).resolve(name)


def test_the_base_is_each_tensor_as_of_that_version_or_the_checkpoints(tmp_path, checkpoint):
    store = VersionStore(tmp_path / "store", keep=2)
    push(store, {NORM: torch.full((4,), 2.0, dtype=torch.bfloat16)})  # version 1
    push(store, {NORM: torch.full((4,), 3.0, dtype=torch.bfloat16)})  # version 2
    two = torch.full((4,), 3.0, dtype=torch.bfloat16)
    assert DeltaBase(store, 1, 2, checkpoint, "bfloat16").read(_mapping(NORM))[0].tolist() == [2.0] * 4
    tensor, crc = DeltaBase(store, 2, 2, checkpoint, "bfloat16").read(_mapping(NORM))
    assert torch.equal(tensor, two) and crc == crc32_of(two)  # the CRC as the store recorded it
    assert DeltaBase(store, 0, 2, checkpoint, "bfloat16").read(_mapping(NORM))[0].tolist() == [1.0] * 4
    tensor, crc = DeltaBase(store, 2, 2, checkpoint, "bfloat16").read(_mapping(Q))  # never pushed: the checkpoint's
    assert torch.equal(tensor, torch.zeros(4, 4, dtype=torch.bfloat16)) and crc is None


def test_a_base_version_not_kept_or_not_committed_is_refused_as_the_client_falls_back_on(tmp_path, checkpoint):
    store = VersionStore(tmp_path / "store", keep=2)
    for value in (2.0, 3.0, 4.0):
        push(store, {NORM: torch.full((4,), value, dtype=torch.bfloat16)})
    with pytest.raises(DeltaBaseUnavailable, match="version 1 is no longer kept"):
        DeltaBase(store, 1, 3, checkpoint, "bfloat16")
    with pytest.raises(DeltaBaseUnavailable, match="4 is not a committed version"):
        DeltaBase(store, 4, 3, checkpoint, "bfloat16")
    assert issubclass(DeltaBaseUnavailable, FailedPrecondition)
    with pytest.raises(InvalidArgument, match="this server runs float32; delta pushes need a bfloat16 engine"):
        DeltaBase(store, 3, 3, checkpoint, "float32")


def _spec(base: np.ndarray, new: np.ndarray, **override) -> tuple[TensorSpec, bytes]:
    payload, changed = encode(base, new)
    delta = DeltaSpec("zlib", zlib.crc32(base.view(np.uint8)), changed, len(payload))
    fields = dict(name=Q, dtype="bfloat16", shape=(4, 4), nbytes=new.nbytes, crc32=zlib.crc32(new.view(np.uint8)), delta=delta)
    return TensorSpec(**{**fields, **override}), payload


def test_rebuild_checks_the_base_then_the_whole_tensor():
    base = torch.zeros(4, 4, dtype=torch.bfloat16)
    bits = base.view(torch.uint16).numpy().reshape(-1)
    new = bits.copy()
    new[[1, 7]] = torch.tensor([0.5, -2.0], dtype=torch.bfloat16).view(torch.uint16).numpy()
    spec, payload = _spec(bits, new)
    assert rebuild(spec, payload, base).view(torch.uint16).numpy().reshape(-1).tolist() == new.tolist()
    with pytest.raises(DeltaBaseUnavailable, match=f"{Q}: its value in the base version has CRC-32"):
        rebuild(spec, payload, torch.ones(4, 4, dtype=torch.bfloat16))
    with pytest.raises(DeltaBaseUnavailable, match="has CRC-32 0x00000005, the client encoded against"):
        rebuild(spec, payload, base, base_crc=5)  # as the store recorded it
    wrong, payload = _spec(bits, new, crc32=1)
    with pytest.raises(DataLoss, match="rebuilt from its delta, its CRC-32 is .*, the header declared 0x00000001"):
        rebuild(wrong, payload, base)
    with pytest.raises(DataLoss, match=f"{Q}: not a valid delta: the zlib stream is corrupt"):
        rebuild(spec, b"\x00" + payload[1:], base)
