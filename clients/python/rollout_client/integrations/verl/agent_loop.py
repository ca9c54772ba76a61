"""verl's agent loops run against rollout-service directly, outside verl's trainer.

An agent loop (verl's ToolAgentLoop, SingleTurnAgentLoop or one of your own) calls
`server_manager.generate(request_id, prompt_ids=..., sampling_params=...)` for every assistant
turn and expects a TokenOutput: verl's LLMServerClient contract. `RolloutServiceServerManager`
answers it with the plugin's own server logic (server.RolloutServiceServer: max_tokens filled in
as verl's vLLM server does, a trajectory's turns on one service replica, exact logprobs, each
turn's weight versions in `extra_fields`), in this process: no verl replicas, load balancer or Ray
actors. For evaluation harnesses, custom RL loops and tests; inside verl's trainer the plugin
serves the same calls through verl's own managers.

    manager = RolloutServiceServerManager(rollout_config, Connection("svc:50051"))
    loop = ToolAgentLoop(trainer_config=..., server_manager=manager, tokenizer=tok, ...)
    output = await loop.run(sampling_params, raw_prompt=messages)   # inside the running event loop
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from verl.workers.rollout.replica import TokenOutput

from rollout_client.integrations.connection import Connection
from rollout_client.integrations.verl.server import RolloutServiceServer


class RolloutServiceServerManager:
    """verl's server-manager `generate` over rollout-service. `rollout_config`: verl's
    `actor_rollout_ref.rollout` config (RolloutConfig or its DictConfig: prompt_length,
    response_length, max_model_len, ...)."""

    def __init__(self, rollout_config: Any, connection: Connection):
        self._server = RolloutServiceServer(rollout_config, replica_rank=0, connection=connection)

    async def generate(
        self, request_id: str, *, prompt_ids: Sequence[int], sampling_params: dict[str, Any], **kwargs: Any
    ) -> TokenOutput:
        """One assistant turn: the token ids sampled after `prompt_ids` (the whole context so far,
        never re-tokenized), their logprobs when `sampling_params["logprobs"]`, and
        `extra_fields["weight_version"]` / `["first_weight_version"]`. Multimodal inputs are refused."""
        return await self._server.generate(
            prompt_ids=list(prompt_ids), sampling_params=dict(sampling_params), request_id=request_id, **kwargs
        )
