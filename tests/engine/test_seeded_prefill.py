"""Seeded requests whose prompts do not fit one engine step's token budget.

vLLM 0.32's model runner rewinds a seeded request's generator by 4 Philox offsets when it drops
the token sampled at the end of a partial prefill chunk (`gpu_model_runner._bookkeeping_sync`).
A CPU torch.Generator has no offset: `set_offset` raises "CPU Generator does not use offset"
and the engine core dies, so one seeded call with long prompts under load (an agent's turns, a
verl batch) ends every call on that server. The service turns chunked prefill off on CPU
(engine.engine_args): a prompt is prefilled in one step, so no sampled token is ever dropped."""

from __future__ import annotations

import random
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.engine

PROMPT_TOKENS = 200


def long_prompts(count: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(10, 2000) for _ in range(PROMPT_TOKENS)] for _ in range(count)]


def test_seeded_long_prompts_beyond_one_steps_token_budget_leave_the_engine_serving(bf16_client):
    prompts = long_prompts(40)  # 8000 prompt tokens: more than one step's budget
    completions = bf16_client.generate(prompt_token_ids=prompts, max_tokens=4, seed=3, temperature=1.0, ignore_eos=True)
    assert [len(c.samples[0].token_ids) for c in completions] == [4] * 40
    again = bf16_client.generate(prompt_token_ids=prompts[:1], max_tokens=4, seed=3, temperature=1.0, ignore_eos=True)
    assert len(again[0].samples[0].token_ids) == 4  # still serving


@pytest.mark.slow  # an upstream canary (1 min): make test-all
def test_vllm_itself_dies_on_a_seeded_partial_prefill_on_cpu(tiny_model):
    """The upstream breakage the service works around (fails once vLLM fixes it: then the
    workaround in engine_args can go)."""
    script = textwrap.dedent(f"""
        from vllm import LLM, SamplingParams
        llm = LLM(model={str(tiny_model)!r}, max_model_len=256, enable_chunked_prefill=True, max_num_batched_tokens=64,
                  max_num_seqs=4)
        try:
            llm.generate([{{"prompt_token_ids": list(range(10, {10 + PROMPT_TOKENS}))}}], SamplingParams(max_tokens=2, seed=1))
        except Exception as exc:
            print("ENGINE ERROR", type(exc).__name__, exc)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                         env={**__import__("os").environ, "VLLM_CPU_KVCACHE_SPACE": "1"})
    assert "CPU Generator does not use offset" in out.stdout + out.stderr, out.stdout[-2000:] + out.stderr[-2000:]
