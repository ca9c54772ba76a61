"""PushSession without an engine: assembly, checks, conversion, bounded memory."""

from __future__ import annotations

import asyncio
import zlib

import pytest
import torch
from safetensors.torch import load_file

from rollout_service.errors import DataLoss, InvalidArgument
from rollout_service.quant.recipe import Recipe
from rollout_service.weights.engine_format import to_engine_format
from rollout_service.weights.manifest import ParamTable, PushHeader, TensorSpec
from rollout_service.weights.session import PushSession
from rollout_service.weights.staging import ShardWriter

TABLE = ParamTable({"a.weight": (64, 32), "b.weight": (16, 32), "model.layers.0.mlp.up_proj.weight": (64, 32)})


def spec(name: str, t: torch.Tensor) -> TensorSpec:
    raw = t.contiguous().view(torch.uint8).numpy().tobytes()
    return TensorSpec(name, str(t.dtype).removeprefix("torch."), tuple(t.shape), len(raw), zlib.crc32(raw))


def raw(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def staged(s: PushSession) -> dict[str, torch.Tensor]:
    """What a finished session staged, by checkpoint name."""
    out = {}
    for path in set(s.spool.files.values()):
        out.update(load_file(path))
    return out


def session(tmp_path, tensors: dict[str, torch.Tensor], budget: int = 1 << 20, quant=None) -> PushSession:
    header = PushHeader(tuple(spec(n, t) for n, t in tensors.items()))
    recipe = Recipe(quant) if quant else None
    convert = lambda name, t: to_engine_format(name, t, torch.bfloat16, recipe)  # noqa: E731
    return PushSession(header, TABLE, convert, ShardWriter(tmp_path, part_bytes=4096), budget)


def test_chunks_of_interleaved_tensors_assemble_convert_and_stage(tmp_path):
    a = torch.randn(64, 32)  # float32 on the wire, bfloat16 in the engine
    b = torch.randn(16, 32).to(torch.bfloat16)

    async def run():
        s = session(tmp_path, {"a.weight": a, "b.weight": b})
        ra, rb = raw(a), raw(b)
        for off in range(0, len(ra), 1000):  # interleave the two tensors' chunks
            await s.add_chunk(0, off, ra[off : off + 1000])
            if off < len(rb):
                await s.add_chunk(1, off, rb[off : off + 1000])
        await s.finish()
        s.close()
        return s

    s = asyncio.run(run())
    out = staged(s)
    assert torch.equal(out["a.weight"], a.to(torch.bfloat16)) and torch.equal(out["b.weight"], b)
    assert s.bytes_received == a.numel() * 4 + b.numel() * 2 and s.convert_s > 0


@pytest.mark.parametrize("fmt", ["int8", "fp8", "fp8_channel"])
def test_quantized_parameters_are_staged_requantized_with_their_scale(tmp_path, fmt):
    """What the engine will load is exactly quant.quantize_weight's output (FP8 included: the
    staging and the math run on CPU; only the FP8 engine needs a GPU)."""
    from rollout_service.quant import quantize_weight

    w = torch.randn(64, 32).to(torch.bfloat16)

    async def run():
        s = session(tmp_path, {"model.layers.0.mlp.up_proj.weight": w}, quant=fmt)
        await s.add_chunk(0, 0, raw(w))
        await s.finish()
        s.close()
        return s

    s = asyncio.run(run())
    part = load_file(s.spool.files["model.layers.0.mlp.up_proj.weight"])
    q, scale = quantize_weight(w, fmt)
    assert part["model.layers.0.mlp.up_proj.weight"].dtype == q.dtype
    assert torch.equal(part["model.layers.0.mlp.up_proj.weight"].view(torch.uint8), q.view(torch.uint8))
    assert torch.equal(part["model.layers.0.mlp.up_proj.weight_scale"], scale)


def test_memory_in_flight_stays_within_the_budget(tmp_path):
    """Ten 8 KiB tensors through a 16 KiB budget: never more than two in memory at once."""
    tensors = {f"t{i}.weight": torch.randn(64, 32) for i in range(10)}
    table = ParamTable({n: (64, 32) for n in tensors})
    peak = 0

    async def run():
        nonlocal peak
        header = PushHeader(tuple(spec(n, t) for n, t in tensors.items()))
        s = PushSession(header, table, lambda n, t: {n: t.clone()}, ShardWriter(tmp_path, 1 << 30), budget := 16384)
        for i, t in enumerate(tensors.values()):
            data = raw(t)
            await s.add_chunk(i, 0, data[:4000])
            peak = max(peak, s._in_use)
            await s.add_chunk(i, 4000, data[4000:])
        await s.finish()
        s.close()
        assert peak <= budget

    asyncio.run(run())
    assert peak > 0


@pytest.mark.parametrize(
    "mutate, error, text",
    [
        (lambda d: d[:-4], DataLoss, "8188 of 8192 bytes received before the commit"),
        (lambda d: bytes([d[0] ^ 1]) + d[1:], DataLoss, "CRC-32 of the received bytes"),
    ],
)
def test_incomplete_or_corrupt_tensors_fail_at_the_commit(tmp_path, mutate, error, text):
    a = torch.randn(64, 32)

    async def run():
        s = session(tmp_path, {"a.weight": a})
        await s.add_chunk(0, 0, mutate(raw(a)))
        try:
            await s.finish()
        finally:
            s.close()

    with pytest.raises(error, match=text):
        asyncio.run(run())


def test_a_nan_is_reported_with_its_tensor_and_index(tmp_path):
    a = torch.randn(64, 32)
    a[3, 7] = float("nan")

    async def run():
        s = session(tmp_path, {"a.weight": a})
        await s.add_chunk(0, 0, raw(a))
        try:
            await s.finish()
        finally:
            s.close()

    with pytest.raises(InvalidArgument, match=r"a.weight: 1 non-finite value\(s\), the first nan at index \[3, 7\]"):
        asyncio.run(run())


def test_discarding_a_spool_removes_everything_staged(tmp_path):
    spool = ShardWriter(tmp_path, part_bytes=1)
    spool.add({"x": torch.zeros(4)})
    assert any(spool.dir.iterdir())
    spool.discard()
    assert not spool.dir.exists()


def test_staged_files_are_safetensors_that_the_library_reads_back(tmp_path):
    from rollout_service.weights.staging import write_safetensors

    tensors = {
        "bf16": torch.randn(3, 5).to(torch.bfloat16), "f32": torch.randn(7), "f16": torch.randn(2, 2).half(),
        "i8": torch.randint(-128, 127, (4, 3), dtype=torch.int8), "f8": torch.randn(6).to(torch.float8_e4m3fn),
    }
    write_safetensors(tensors, tmp_path / "x.safetensors")
    back = load_file(tmp_path / "x.safetensors")
    assert back.keys() == tensors.keys()
    assert all(back[k].dtype == t.dtype and torch.equal(back[k].view(torch.uint8), t.view(torch.uint8)) for k, t in tensors.items())


def test_closing_a_failed_push_waits_for_its_conversion_off_the_event_loop(tmp_path):
    """A push cancelled while a tensor converts: the close waits for that conversion on a thread,
    and the loop (which serves Generate in the single-process server) keeps running meanwhile.

    No timing: the conversion is released by a coroutine on the loop, after the close has begun,
    so a close that held the loop would never see it released. The timeouts only bound a hang."""
    import threading

    from rollout_service.weights.service import close_session

    converting, converted, closing_started, release = (threading.Event() for _ in range(4))
    released_in_time, converted_when_closed = [], []
    a = torch.randn(64, 32)

    def slow_convert(name, t):
        converting.set()
        released_in_time.append(release.wait(60))
        out = to_engine_format(name, t, torch.bfloat16, None)
        converted.set()
        return out

    class Observed(PushSession):
        """The real session; it only reports when its close begins and what it waited for."""

        def close(self) -> None:
            closing_started.set()
            super().close()
            converted_when_closed.append(converted.is_set())

    async def run():
        header = PushHeader((spec("a.weight", a),))
        s = Observed(header, TABLE, slow_convert, ShardWriter(tmp_path, part_bytes=4096), 1 << 20)
        await s.add_chunk(0, 0, raw(a))  # the whole tensor: its conversion starts, and blocks
        assert await asyncio.to_thread(converting.wait, 60)
        closing = asyncio.create_task(close_session(s, s.spool))
        # This coroutine runs on the loop while the close is under way: the loop is free.
        assert await asyncio.to_thread(closing_started.wait, 60)
        assert not closing.done()  # the close waits for the conversion, still held below
        release.set()
        await asyncio.wait_for(closing, 60)
        assert released_in_time == [True]  # released by this coroutine, not by the bound
        assert converted_when_closed == [True]  # the close returned only after the conversion
        assert not s.spool.dir.exists()  # its staging dropped

    asyncio.run(run())


def test_a_delta_tensor_takes_from_the_push_buffer_what_rebuilding_it_allocates():
    """A delta is rebuilt whole beside its base: it reserves its wire bytes and DELTA_REBUILD_FACTOR
    times its dense bytes (base read, a fused base joined, the decode and its result), and the decode
    alone (numpy, traced) stays within the share the factor gives it."""
    import tracemalloc

    import numpy as np
    from rollout_client import delta as codec

    from rollout_service.weights.delta import rebuild
    from rollout_service.weights.manifest import DeltaSpec
    from rollout_service.weights.session import DELTA_REBUILD_FACTOR, _cost

    n = 1 << 22  # 8 MiB of bf16
    base = torch.randn(n).to(torch.bfloat16)
    new = base.clone()
    new[torch.randperm(n)[: n // 10]] += 0.01
    bits, new_bits = base.view(torch.uint16).numpy(), new.view(torch.uint16).numpy()
    payload, changed = codec.encode(bits, new_bits)
    delta = DeltaSpec("zlib", zlib.crc32(bits.view(np.uint8)), changed, len(payload))
    spec = TensorSpec("w", "bfloat16", (n,), 2 * n, zlib.crc32(new_bits.view(np.uint8)), delta)
    assert _cost(spec) == len(payload) + DELTA_REBUILD_FACTOR * 2 * n
    assert _cost(TensorSpec("w", "bfloat16", (n,), 2 * n)) == 2 * n  # a whole tensor: its bytes
    tracemalloc.start()
    try:
        rebuilt = rebuild(spec, payload, base)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert torch.equal(rebuilt, new)
    # The base read and a fused join are the other two of the factor.
    assert peak <= (DELTA_REBUILD_FACTOR - 2) * spec.nbytes, peak / spec.nbytes


@pytest.mark.parametrize("how, path", [("chunks", "stream"), ("shared", "shared_memory"), ("load", "load")])
def test_a_session_names_the_path_its_bytes_came_by(tmp_path, how, path):
    """The path labels the push metrics (observe/metrics.py)."""
    b = torch.randn(16, 32).to(torch.bfloat16)

    async def run() -> str:
        header = PushHeader((spec("b.weight", b),), loaded_from="/ckpt/step-3" if how == "load" else "")
        s = PushSession(header, TABLE, lambda name, t: {name: t}, ShardWriter(tmp_path, part_bytes=4096), 1 << 20)
        if how == "shared":
            await s.add_shared(0, memoryview(raw(b)))
        else:
            await s.add_chunk(0, 0, raw(b))
        await s.finish()
        s.close()
        return s.path

    assert asyncio.run(run()) == path
