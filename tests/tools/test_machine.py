"""The CPU description written next to CPU figures names the model and the ISA flags that change
what vLLM's CPU kernels do."""

from __future__ import annotations

from rollout_service.tools.machine import cpu, usable_cores

AMD = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse2 avx avx2 fma\n\nprocessor\t: 1\nmodel name\t: other\n"
INTEL = (
    "model name\t: Intel(R) Xeon(R) Platinum 8481C\n"
    "flags\t\t: avx2 avx512f avx512_vnni avx512_bf16 amx_bf16 amx_int8 amx_tile\n"
)


def test_an_avx2_only_cpu_says_what_it_lacks():
    assert cpu(AMD) == f"AMD EPYC, {len(usable_cores())} cores, avx2 (no avx512f avx512_vnni avx512_bf16 amx_bf16 amx_int8)"


def test_an_amx_cpu_lists_every_flag_and_lacks_none():
    assert cpu(INTEL) == f"Intel(R) Xeon(R) Platinum 8481C, {len(usable_cores())} cores, avx2 avx512f avx512_vnni avx512_bf16 amx_bf16 amx_int8"


def test_this_machine_is_described():
    assert f"{len(usable_cores())} cores" in cpu()
