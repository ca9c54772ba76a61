"""The CPU a figure was measured on: vLLM's CPU kernels take different paths per instruction set
(bf16 on AMX is fast, int8 on AVX2 without VNNI saturates, vLLM's int8 reload breaks only on some),
so every CPU figure (reports, benchmarks, the int8 probe) names the CPU model and these flags."""

from __future__ import annotations

import os
import platform
from pathlib import Path

# The instruction-set flags that change what vLLM's CPU backend does.
FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


def usable_cores() -> list[int]:
    """The cores this process may run on (taskset, a container's cpuset), not all the machine's."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def cpu(cpuinfo: str | None = None) -> str:
    """E.g. 'AMD EPYC, 2 cores, avx2 (no avx512f avx512_vnni avx512_bf16 amx_bf16 amx_int8)', read
    from /proc/cpuinfo (or the given text of one)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:  # not Linux
            cpuinfo = ""
    info: dict[str, str] = {}
    for line in cpuinfo.splitlines():  # the first CPU's lines
        key, _, value = line.partition(":")
        info.setdefault(key.strip(), value.strip())
    head = f"{info.get('model name') or platform.processor() or platform.machine()}, {len(usable_cores())} cores"
    if "flags" not in info:
        return head
    flags = set(info["flags"].split())
    have = [f for f in FLAGS if f in flags]
    missing = [f for f in FLAGS if f not in flags]
    return f"{head}, {' '.join(have) or 'none of these'}" + (f" (no {' '.join(missing)})" if missing else "")
