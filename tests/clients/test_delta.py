"""The delta encoding (rollout_client.delta) and the client's record of what it pushed
(push.DeltaPlan), without a server."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch

from rollout_client import delta
from rollout_client.push import DeltaBase, DeltaPlan, as_bytes

RNG = np.random.default_rng(0)


def _changed(base: np.ndarray, index) -> np.ndarray:
    new = base.copy()
    new[index] += 1
    return new


@pytest.mark.parametrize("size, index", [
    (10, []),  # nothing changed
    (10, list(range(10))),  # everything
    (delta.BLOCK, [0, delta.BLOCK - 1]),  # both ends of one block
    (3 * delta.BLOCK + 5, [delta.BLOCK - 1, delta.BLOCK, 2 * delta.BLOCK + 7, 3 * delta.BLOCK + 4]),  # across blocks, a short last one
    (300_000, sorted(RNG.choice(300_000, 4000, replace=False).tolist())),
])
@pytest.mark.parametrize("codec", delta.CODECS)
def test_a_delta_rebuilds_the_new_bits_exactly(size, index, codec):
    base = RNG.integers(0, 1 << 16, size, dtype=np.uint16)
    new = _changed(base, index)
    new[index[::3]] -= 7  # larger moves and wraps too
    payload, changed = delta.encode(base, new, codec)
    assert changed == int((base != new).sum())
    assert np.array_equal(delta.decode(base, payload, changed, codec), new)


def test_a_small_step_compresses_to_a_few_percent_of_the_tensor():
    w = torch.randn(1024, 1024) * 0.02
    base = w.to(torch.bfloat16).view(torch.uint16).numpy().reshape(-1).copy()
    new = (w + 3e-6 * torch.randn_like(w)).to(torch.bfloat16).view(torch.uint16).numpy().reshape(-1).copy()
    payload, changed = delta.encode(base, new)
    assert 0.01 < changed / base.size < 0.2 and len(payload) < 0.1 * base.nbytes


def _raw(counts, gaps, diffs) -> bytes:
    def planes(v):
        v = np.asarray(v, dtype="<u2").view(np.uint8).reshape(-1, 2)
        return v[:, 0].tobytes() + v[:, 1].tobytes()

    return np.asarray(counts, "<u4").tobytes() + planes(gaps) + planes(diffs)


BASE = np.zeros(delta.BLOCK + 10, dtype=np.uint16)  # two blocks


@pytest.mark.parametrize("payload, changed, codec, message", [
    (b"not zlib at all", 1, "zlib", "the zlib stream is corrupt"),
    (zlib.compress(_raw([1, 0], [3], [2])) + b"tail", 1, "zlib", "does not end after the 12 bytes"),
    (zlib.compress(_raw([1, 0], [3], [2]) + b"more"), 1, "zlib", "does not end after the 12 bytes"),
    (_raw([1, 0], [3], [2])[:-1], 1, "none", "11 bytes decoded where a delta of 1 changes holds 12"),
    (_raw([2, 0], [3], [2]), 1, "none", "the block counts add up to 2 changes, the spec declares 1"),
    (_raw([2, 0], [3, 0], [2, 2]), 2, "none", "a gap of 0 between two changed elements"),
    (_raw([2, 0], [60000, 6000], [2, 2]), 2, "none", "an offset of 66000 in a block of 65536"),
    (_raw([0, 1], [10], [2]), 1, "none", f"element {delta.BLOCK + 10} is beyond the tensor's {delta.BLOCK + 10}"),
    (b"", 1, "lz4", "codec 'lz4' is not one of zlib, none"),
    (b"", BASE.size + 1, "none", f"changed={BASE.size + 1} is outside"),
])
def test_bytes_that_are_no_delta_of_the_tensor_are_refused_saying_why(payload, changed, codec, message):
    with pytest.raises(delta.DeltaFormatError, match=message):
        delta.decode(BASE, payload, changed, codec)


def test_a_zlib_bomb_is_refused_without_inflating_it():
    bomb = zlib.compress(bytes(1 << 30))  # 1 GiB of zeros in about 1 MB
    with pytest.raises(delta.DeltaFormatError, match="does not end after the 12 bytes"):
        delta.decode(BASE, bomb, 1, "zlib")


def _plan(base: DeltaBase, codec: str = "zlib") -> DeltaPlan:
    return DeltaPlan(base, codec)


def test_the_first_delta_push_sends_everything_whole_and_records_a_bf16_copy():
    base = DeltaBase()
    t = torch.randn(64, 64)
    dtype, shape, flat = as_bytes("w", t, to_bf16=True)  # float32 cast as the server casts it
    assert dtype == "bfloat16" and np.array_equal(flat.view(np.uint16), t.to(torch.bfloat16).view(torch.uint16).numpy().reshape(-1))
    spec, sent = _plan(base).encode("w", dtype, shape, flat, zlib.crc32(flat))
    assert spec is None and sent is flat and base.tensors["w"].shape == (64, 64) and base.nbytes == 64 * 64 * 2
    assert base.tensors["w"].base is None  # a copy: the caller's tensor may change under it


def test_a_tensor_with_a_base_goes_as_its_delta_and_the_base_moves_on():
    base = DeltaBase()
    old = torch.randn(256, 256).to(torch.bfloat16)
    _, shape, flat = as_bytes("w", old)
    _plan(base).encode("w", "bfloat16", shape, flat, zlib.crc32(flat))
    base.version = 3
    new = old.clone()
    new.view(-1)[::50] += 1
    _, shape, flat = as_bytes("w", new)
    plan = _plan(base)
    spec, payload = plan.encode("w", "bfloat16", shape, flat, zlib.crc32(flat))
    assert plan.base_version == 3 and spec.changed == len(range(0, 256 * 256, 50)) and spec.wire_nbytes == payload.nbytes
    assert spec.base_crc32 == zlib.crc32(old.view(torch.uint16).numpy().tobytes())
    assert np.array_equal(base.tensors["w"].reshape(-1), flat.view(np.uint16)) and plan.taken == [("w", None)]


def test_a_delta_larger_than_half_the_tensor_goes_whole_and_a_float32_push_drops_the_base():
    base = DeltaBase()
    _, shape, flat = as_bytes("w", torch.randn(128, 128).to(torch.bfloat16))
    _plan(base).encode("w", "bfloat16", shape, flat, 0)
    base.version = 1
    _, shape, flat = as_bytes("w", torch.randn(128, 128).to(torch.bfloat16))  # every value new
    spec, sent = _plan(base).encode("w", "bfloat16", shape, flat, 0)
    assert spec is None and sent is flat
    _, shape, flat = as_bytes("w", torch.randn(128, 128))
    _plan(base).encode("w", "float32", shape, flat, 0)
    assert "w" not in base.tensors


def test_a_refused_delta_push_is_resent_whole_tensor_by_tensor_as_taken_numpy_float32_too():
    """What a fallback sends again: every tensor taken, once, in order -- bf16 ones from the base
    (their new values), others (kept out of the base) as the caller gave them."""
    base = DeltaBase()
    bf16 = torch.randn(8, 8).to(torch.bfloat16)
    _, shape, flat = as_bytes("a", bf16)
    _plan(base).encode("a", "bfloat16", shape, flat, 0)
    base.version = 2
    plan = _plan(base)
    newer = bf16 + 1
    for name, tensor in (("a", newer), ("b", np.ones((3, 5), np.float32))):
        dtype, shape, flat = as_bytes(name, tensor, to_bf16=True)
        plan.encode(name, dtype, shape, flat, zlib.crc32(flat))
    resent = [(name, as_bytes(name, held)) for name, held in plan.resent()]
    assert [name for name, _ in resent] == ["a", "b"]
    (_, (dtype_a, shape_a, flat_a)), (_, (dtype_b, shape_b, flat_b)) = resent
    assert (dtype_a, shape_a) == ("bfloat16", (8, 8)) and np.array_equal(flat_a.view(np.uint16), newer.view(torch.uint16).numpy().reshape(-1))
    assert (dtype_b, shape_b) == ("float32", (3, 5)) and np.array_equal(flat_b.view(np.float32), np.ones(15, np.float32))
