"""Run by test_int8_cpu.py and test_moe_cpu.py in a child process (vLLM engines want their own
process): reloads checkpoints into a running engine through our route (`rollout_apply`, with the
int8_cpu / moe_cpu workarounds) and through vLLM's own `reload_weights`. Prints one line:
RESULT <json>."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from vllm import LLM, SamplingParams

from rollout_service.weights.store import safetensors_names


def main(w0: Path, w1: Path) -> None:
    llm = LLM(
        str(w0), max_model_len=128, generation_config="vllm",
        worker_extension_cls="rollout_service.engine.worker_ext.RolloutWorkerExtension",
    )
    params = SamplingParams(temperature=0.0, max_tokens=8, logprobs=0, ignore_eos=True)

    def logprobs() -> list[float]:
        out = llm.generate([{"prompt_token_ids": [5, 6, 7, 8]}], params, use_tqdm=False)[0].outputs[0]
        return [lp[t].logprob for lp, t in zip(out.logprobs, out.token_ids)]

    def ours(checkpoint: Path) -> list[float]:
        files = sorted(checkpoint.glob("*.safetensors"))
        llm.collective_rpc("rollout_apply", args=([(str(f), safetensors_names(f)) for f in files],))
        return logprobs()

    before = logprobs()
    same = ours(w0)  # the very checkpoint the engine runs
    ours_w1 = ours(w1)
    restored = ours(w0)
    # vLLM's own route, to W1 (from W0): NaN, exactly ours, or something else.
    llm.collective_rpc("reload_weights", kwargs={"weights_path": str(w1)})
    vllms = logprobs()
    print("RESULT", json.dumps({
        "before": before,
        "ours_same_equal": same == before,
        "ours_w1_changed": ours_w1 != before,
        "ours_restored_equal": restored == before,
        "vllm_nan": any(math.isnan(x) for x in vllms),
        "vllm_equal_ours": vllms == ours_w1,
        "vllm_max_abs_diff": max(abs(a - b) for a, b in zip(vllms, ours_w1)),
    }), flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
