"""Run by test_int8_cpu.py in a child process (vLLM engines want their own process): shows that
vLLM's own in-place reload breaks an int8 model on CPU, and that int8_cpu's route reloads it exactly.
Prints one line: RESULT <json>."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from vllm import LLM, SamplingParams

from rollout_service.weights.store import safetensors_names


def main(checkpoint: Path) -> None:
    llm = LLM(
        str(checkpoint), max_model_len=128, generation_config="vllm",
        worker_extension_cls="rollout_service.engine.worker_ext.RolloutWorkerExtension",
    )
    params = SamplingParams(temperature=0.0, max_tokens=8, logprobs=0, ignore_eos=True)

    def logprobs() -> list[float]:
        out = llm.generate([{"prompt_token_ids": [5, 6, 7, 8]}], params, use_tqdm=False)[0].outputs[0]
        return [lp[t].logprob for lp, t in zip(out.logprobs, out.token_ids)]

    before = logprobs()
    # Ours: reload the very checkpoint the engine runs through rollout_apply (int8_cpu for the
    # W8A8 layers).
    files = sorted(checkpoint.glob("*.safetensors"))
    llm.collective_rpc("rollout_apply", args=([(str(f), safetensors_names(f)) for f in files],))
    ours = logprobs()
    # vLLM's own route, the same checkpoint.
    llm.collective_rpc("reload_weights", kwargs={"weights_path": str(checkpoint)})
    vllms = logprobs()
    print("RESULT", json.dumps({
        "before": before,
        "ours_equal": ours == before,
        "vllm_reload_nan": any(math.isnan(x) for x in vllms),
    }), flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
