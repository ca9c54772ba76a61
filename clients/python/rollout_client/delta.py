"""The delta encoding of a bfloat16 tensor against an earlier value of it (DeltaSpec in the proto).

Between two RL steps most bf16 weights do not change at all (1-4 % of them change at lr 1e-6, 8-25 %
at 1e-5), and those that do mostly move by one step of the bf16 bit pattern. So a delta lists the
changed elements by their gaps (uint16, blocks of 65536 elements so a gap always fits) and their
change as a small int16 difference of bit patterns, zigzag-encoded; both as byte planes (all low
bytes, then all high bytes, which are nearly all zero) and compressed with zlib. Measured on AdamW
steps of a 2048x2048 weight: 0.009 of the dense bytes at lr 1e-6, 0.048 at lr 1e-5 (the sparse
int32-index + value layout: 0.039 and 0.26; XOR + zstd: 0.018 and 0.088).

Both sides work on the bit patterns as uint16 arrays; the rebuilt tensor is exact (integer
arithmetic modulo 2^16), and the server checks it against the CRC-32 of the whole tensor.
"""

from __future__ import annotations

import zlib

import numpy as np

CODECS = ("zlib", "none")
BLOCK = 1 << 16
# A tensor whose delta would be more than this share of its dense bytes is sent whole.
MAX_RATIO = 0.5


class DeltaFormatError(ValueError):
    """Bytes that are not a valid delta of the declared tensor (the message says what is wrong)."""


def _planes(values: np.ndarray) -> bytes:
    v = values.astype("<u2", copy=False).view(np.uint8).reshape(-1, 2)
    return v[:, 0].tobytes() + v[:, 1].tobytes()


def _unplanes(data: bytes | memoryview, n: int) -> np.ndarray:
    b = np.frombuffer(data, dtype=np.uint8)
    return (b[:n].astype(np.uint16) | (b[n:].astype(np.uint16) << 8))


def encode(base: np.ndarray, new: np.ndarray, codec: str = "zlib") -> tuple[bytes, int]:
    """(payload, changed): `new` as a delta against `base` (flat uint16 arrays of bf16 bits)."""
    if codec not in CODECS:
        raise ValueError(f"delta codec {codec!r} is not one of {', '.join(CODECS)}")
    index = np.flatnonzero(base != new)
    blocks = -(-base.size // BLOCK)
    block = index >> 16
    counts = np.bincount(block, minlength=blocks).astype("<u4")
    local = (index & (BLOCK - 1)).astype(np.int64)
    gaps = local.copy()
    if index.size:
        first = np.empty(index.size, dtype=bool)
        first[0] = True
        first[1:] = block[1:] != block[:-1]
        gaps[1:] -= local[:-1]
        gaps[first] = local[first]
    diff = (new[index].astype(np.int32) - base[index].astype(np.int32)).astype(np.int16)
    zigzag = ((diff.astype(np.int32) << 1) ^ (diff.astype(np.int32) >> 15)).astype(np.uint16)
    raw = counts.tobytes() + _planes(gaps) + _planes(zigzag)
    return (zlib.compress(raw, 1) if codec == "zlib" else raw), int(index.size)


def decode(base: np.ndarray, payload: bytes | memoryview, changed: int, codec: str) -> np.ndarray:
    """The new tensor's bits (a new flat uint16 array) from `base` and a delta; DeltaFormatError
    for anything that is not a delta of a tensor of base's size with `changed` changed elements."""
    if codec not in CODECS:
        raise DeltaFormatError(f"codec {codec!r} is not one of {', '.join(CODECS)}")
    if not 0 <= changed <= base.size:
        raise DeltaFormatError(f"changed={changed} is outside 0..{base.size} (the tensor's elements)")
    blocks = -(-base.size // BLOCK)
    size = 4 * blocks + 4 * changed
    if codec == "zlib":
        inflater = zlib.decompressobj()
        try:
            raw = inflater.decompress(payload, size)  # never more than a valid delta holds
        except zlib.error as exc:
            raise DeltaFormatError(f"the zlib stream is corrupt ({exc})") from None
        if not inflater.eof or inflater.unconsumed_tail or inflater.unused_data:
            raise DeltaFormatError(f"the zlib stream does not end after the {size} bytes a delta of {changed} changes holds")
    else:
        raw = bytes(payload)
    if len(raw) != size:
        raise DeltaFormatError(f"{len(raw)} bytes decoded where a delta of {changed} changes holds {size}")
    counts = np.frombuffer(raw, dtype="<u4", count=blocks).astype(np.int64)
    if int(counts.sum()) != changed:
        raise DeltaFormatError(f"the block counts add up to {int(counts.sum())} changes, the spec declares {changed}")
    gaps = _unplanes(memoryview(raw)[4 * blocks : 4 * blocks + 2 * changed], changed).astype(np.int64)
    zigzag = _unplanes(memoryview(raw)[4 * blocks + 2 * changed :], changed).astype(np.int32)
    block = np.repeat(np.arange(blocks, dtype=np.int64), counts)
    first = np.zeros(changed, dtype=bool)
    starts = np.cumsum(counts) - counts
    first[starts[counts > 0]] = True
    if changed and (gaps[~first] == 0).any():
        raise DeltaFormatError("a gap of 0 between two changed elements of a block (offsets must increase)")
    # Offsets within each block: a running sum of the gaps, restarted at each block's first change.
    running = np.cumsum(gaps)
    restart = np.where(first, running - gaps, 0)
    local = running - np.maximum.accumulate(restart) if changed else running
    if changed and int(local.max()) >= BLOCK:
        raise DeltaFormatError(f"an offset of {int(local.max())} in a block of {BLOCK} elements")
    index = block * BLOCK + local
    if changed and int(index.max()) >= base.size:
        raise DeltaFormatError(f"element {int(index.max())} is beyond the tensor's {base.size}")
    diff = ((zigzag >> 1) ^ -(zigzag & 1)).astype(np.int32)
    out = base.copy()
    out[index] = ((base[index].astype(np.int32) + diff) & 0xFFFF).astype(np.uint16)
    return out
