"""`serve --quantization int8` quantizes the bf16 checkpoint at load and serves it on vLLM's W8A8
path: the int8 weights are in use. Their numerics are checked against an independent plain-torch
W8A8 forward in `test_int8_reference.py`."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.engine


def test_int8_server_serves_quantized_weights(int8_server, bf16_client):
    from rollout_client import RolloutClient

    prompts = [[(7 * i + j) % 2000 + 10 for j in range(12)] for i in range(4)]
    kwargs = dict(prompt_token_ids=prompts, max_tokens=16, temperature=1.0, seed=5, ignore_eos=True)
    with RolloutClient(int8_server.grpc_address, timeout=120) as client:
        status = client.status()
        int8 = client.generate(**kwargs)
    assert status.quantization == "int8" and status.dtype == "bfloat16"
    bf16 = bf16_client.generate(**kwargs)
    for q in int8:
        for s in q.samples:
            assert len(s.logprobs) == 16 and np.isfinite(s.logprobs).all() and (s.logprobs <= 0).all()
    # Same prompts, same seed: the first token's logprob moves under quantized weights (they are in use).
    first = [(q.samples[0].logprobs[0], b.samples[0].logprobs[0]) for q, b in zip(int8, bf16)]
    assert all(abs(x - y) > 1e-4 for x, y in first), first
