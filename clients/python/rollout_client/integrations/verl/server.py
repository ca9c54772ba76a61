"""The driver side of the plugin: a verl `RolloutReplica` whose server is a CPU Ray actor in front
of rollout-service.

verl's agent loops call `server.generate.remote(prompt_ids=, sampling_params=, request_id=)` on a
replica's server handle and expect a `TokenOutput`; its trainer calls the lifecycle methods
(sleep, wake_up, abort_all_requests, resume_generation, KV-cache calls) around each weight sync.
Here the engines live in the service, so the actor reserves no GPU and no CPU, the lifecycle
calls that move GPU memory are no-ops, and `abort_all_requests` / `resume_generation` stop and
restart this actor's own calls (the service aborts the engine requests of a cancelled call).
"""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any

import ray
from verl.workers.rollout.replica import RolloutMode, RolloutReplica, TokenOutput

from rollout_client.client import SAMPLING_FIELDS, AsyncRolloutClient
from rollout_client.errors import ResourceExhaustedError
from rollout_client.integrations.connection import Connection
from rollout_client.integrations.verl.sessions import TrajectorySessions

# The service answers RESOURCE_EXHAUSTED while its engines are full; verl sends every sequence
# of a batch at once, so a full service is waited out (until the call's timeout), not an error.
_BACKOFF_S = (0.05, 2.0)


def fill_sampling(config: Any, prompt_len: int, sampling_params: dict, max_model_len: int, replica_rank: int) -> tuple[dict, bool]:
    """verl's agent-loop sampling params as the service's, filled in as verl's vLLM server does
    (verl/workers/rollout/vllm_rollout/vllm_async_server.py, `generate`): verl sends no
    `max_tokens`, so it is the response length, bounded by the room left in the context. Returns
    (service sampling fields, whether verl asked for logprobs)."""
    params = dict(sampling_params)
    limit = min(config.max_model_len or math.inf, max_model_len)
    room = int(limit - prompt_len)
    if room < 1:
        raise ValueError(f"a prompt of {prompt_len} tokens leaves no room for a response (max_model_len={limit})")
    if "max_tokens" in params:
        max_tokens = params.pop("max_tokens")
    elif "max_new_tokens" in params:
        max_tokens = params.pop("max_new_tokens")
    else:
        max_tokens = min(config.response_length, config.prompt_length + config.response_length - prompt_len)
    params["max_tokens"] = max(1, min(int(max_tokens), room))
    want_logprobs = bool(params.pop("logprobs", False))  # the service always returns them
    params.setdefault("repetition_penalty", config.repetition_penalty)
    params.setdefault("ignore_eos", config.ignore_eos)
    if config.full_determinism:
        params.setdefault("seed", replica_rank + config.seed)
    if params.get("top_k") == -1:  # verl's "no limit"; the service's is 0
        params["top_k"] = 0
    params = {k: v for k, v in params.items() if v is not None}
    unknown = sorted(set(params) - set(SAMPLING_FIELDS))
    if unknown:
        raise ValueError(f"sampling_params {unknown} have no rollout-service equivalent; known: {list(SAMPLING_FIELDS)}")
    params["detokenize"] = bool(params.get("stop"))  # verl reads token ids; stop strings need text
    return params, want_logprobs


def _steps_of(label: str) -> int | None:
    """The global step a push was labelled with (see RolloutServiceRollout.update_weights)."""
    return int(label) if label.isdigit() else None


_EXTRA_FIELDS = ("weight_version", "first_weight_version", "global_steps", "min_global_steps", "max_global_steps")


class RolloutServiceServer:
    """verl's rollout server interface over rollout-service (run as a Ray actor by the replica).

    Each sample's `extra_fields` carry its `weight_version` and `first_weight_version` (they
    differ only when a push landed mid-sample under the service's "continue" policy) and the
    verl `global_steps` of those versions (`min_global_steps`, `max_global_steps`), read from
    the labels of the pushes that made them. An aborted call has the same keys, all None: verl
    turns them into batch columns, which need every sample to have them.
    """

    def __init__(self, config: Any, replica_rank: int, connection: Connection):
        self.config = config
        self.replica_rank = replica_rank
        self.connection = connection
        self._client: AsyncRolloutClient | None = None
        self._max_model_len: asyncio.Future | None = None
        self._sessions = TrajectorySessions(f"verl-r{replica_rank}")
        self._steps: dict[int, int] = {}  # version -> the global step its push was labelled with
        self._lookups: dict[int, asyncio.Future] = {}  # version -> its label being read
        self._calls: dict[str, asyncio.Future] = {}  # request id -> the call in flight
        self._aborted: set[str] = set()
        self._open = asyncio.Event()
        self._open.set()
        self._reject = False

    @property
    def client(self) -> AsyncRolloutClient:
        # Made on first use, in the actor's event loop (a grpc.aio channel belongs to one loop).
        if self._client is None:
            self._client = AsyncRolloutClient(**self.connection.client_options())
        return self._client

    async def _context_length(self) -> int:
        """The service's max_model_len, read once (the first calls share one GetStatus)."""
        failed = self._max_model_len is not None and self._max_model_len.done() and (self._max_model_len.cancelled() or self._max_model_len.exception())
        if self._max_model_len is None or failed:
            self._max_model_len = asyncio.ensure_future(self.client.status())
        return (await asyncio.shield(self._max_model_len)).max_model_len

    async def generate(
        self,
        prompt_ids: list[int],
        sampling_params: dict[str, Any],
        request_id: str,
        image_data: Any = None,
        video_data: Any = None,
        audio_data: Any = None,
        mm_processor_kwargs: Any = None,
        priority: int = 0,
        **kwargs: Any,
    ) -> TokenOutput:
        given = [name for name, value in (("image_data", image_data), ("video_data", video_data), ("audio_data", audio_data)) if value]
        if given:
            raise ValueError(f"{', '.join(given)}: rollout-service serves text models; multimodal inputs are not supported")
        want_logprobs = bool(sampling_params.get("logprobs", False))
        context = await self._context_length()  # before the gate: nothing may pass it unseen by an abort
        while not self._open.is_set():  # closed by abort_all_requests until resume_generation
            if self._reject:
                return self._aborted_output(want_logprobs)
            await self._open.wait()
        params, _ = fill_sampling(self.config, len(prompt_ids), sampling_params, context, self.replica_rank)
        session = self._sessions.session_for(prompt_ids)
        call = asyncio.ensure_future(self._generate(prompt_ids, params, request_id, session))
        self._calls[request_id] = call
        try:
            sample = await call
        except asyncio.CancelledError:
            if request_id not in self._aborted:
                raise
            return self._aborted_output(want_logprobs)
        finally:
            self._calls.pop(request_id, None)
            self._aborted.discard(request_id)
        self._sessions.record(session, [*prompt_ids, *sample.token_ids])
        first, last = await self._global_steps(sample.first_weight_version), await self._global_steps(sample.weight_version)
        return TokenOutput(
            token_ids=sample.token_ids,
            log_probs=sample.logprobs.tolist() if want_logprobs else None,
            stop_reason="aborted" if sample.finish_reason == "aborted" else "completed",
            extra_fields={
                "weight_version": sample.weight_version,
                "first_weight_version": sample.first_weight_version,
                "global_steps": last,
                "min_global_steps": first,
                "max_global_steps": last,
            },
        )

    @staticmethod
    def _aborted_output(want_logprobs: bool) -> TokenOutput:
        # A cancelled call brings back no tokens: verl's partial-rollout resume restarts it.
        return TokenOutput(
            token_ids=[], log_probs=[] if want_logprobs else None, stop_reason="aborted",
            extra_fields=dict.fromkeys(_EXTRA_FIELDS),
        )

    async def _generate(self, prompt_ids: list[int], params: dict, request_id: str, session: str):
        deadline = time.monotonic() + self.connection.timeout
        backoff = _BACKOFF_S[0]
        while True:
            try:
                completions = await self.client.generate(
                    prompt_token_ids=[prompt_ids], request_id=request_id, session_id=session,
                    timeout=max(1.0, deadline - time.monotonic()), **params,
                )
                return completions[0].samples[0]
            except ResourceExhaustedError:
                if time.monotonic() + backoff > deadline:
                    raise
                await asyncio.sleep(backoff)
                backoff = min(2 * backoff, _BACKOFF_S[1])

    async def _global_steps(self, version: int) -> int | None:
        """The verl global step whose sync produced `version`: its push's label, read from the
        service's last push the first time a sample of that version comes back. None for the
        weights the service started with, and for a version the service had already replaced
        by then (its label is no longer kept); not remembered, so a later sample retries."""
        if version == 0 or version in self._steps:
            return self._steps.get(version)
        lookup = self._lookups.get(version)
        if lookup is None:
            lookup = self._lookups[version] = asyncio.ensure_future(self._label_of(version))
            lookup.add_done_callback(lambda _: self._lookups.pop(version, None))
        steps = await asyncio.shield(lookup)  # one caller cancelled cancels no other's lookup
        if steps is not None:
            self._steps[version] = steps
        return steps

    async def _label_of(self, version: int) -> int | None:
        status = await self.client.status()
        last = status.last_push if status.HasField("last_push") else None
        return _steps_of(last.label) if last is not None and last.version == version else None

    # ---- lifecycle: what verl's trainer and replica call around a weight sync -----------------

    async def abort_all_requests(self, reset_prefix_cache: bool = True, reject_request: bool = False) -> dict:
        """Cancel this server's calls (the service aborts their engine requests; they come back
        with stop_reason "aborted" and no tokens) and hold new ones until resume_generation, or
        answer them aborted at once when `reject_request`. Returns once the cancelled calls have
        ended."""
        self._open.clear()
        self._reject = reject_request
        calls = dict(self._calls)
        self._aborted.update(calls)
        for call in calls.values():
            call.cancel()
        await asyncio.gather(*calls.values(), return_exceptions=True)
        return {"aborted_count": len(calls), "request_ids": list(calls)}

    async def abort_request(self, request_id: str) -> dict:
        call = self._calls.get(request_id)
        if call is not None:
            self._aborted.add(request_id)
            call.cancel()
        return {"aborted": call is not None, "request_id": request_id}

    async def resume_generation(self) -> None:
        self._reject = False
        self._open.set()

    async def sleep(self) -> None:
        """No GPU memory to free here: the engines live in the service."""

    async def wake_up(self, tags: list[str] | None = None) -> None:
        """Nothing to load back: the weights are the service's."""

    async def clear_kv_cache(self) -> None:
        """The service drops its KV and prefix caches itself when a push is applied."""

    release_kv_cache = resume_kv_cache = clear_kv_cache

    async def set_global_steps(self, global_steps: int) -> None:
        """Not needed: each sample's global step comes from the label of the push that made its
        weight version."""

    async def start_profile(self, **kwargs: Any) -> None:
        """Profile the service's engines on the service's side."""

    stop_profile = start_profile


class RolloutServiceReplica(RolloutReplica):
    """A verl rollout replica served by rollout-service: one CPU actor, no GPUs of its own."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.connection = Connection.from_custom(self.config.custom)
        backend = self.config.checkpoint_engine.backend
        if backend != "naive":
            raise ValueError(
                f"actor_rollout_ref.rollout.checkpoint_engine.backend={backend!r}: rollout-service takes weights "
                "over PushWeights from the trainer's rank 0; use 'naive' (no NCCL group reaches the service)"
            )

    def rollout_worker_use_gpu(self) -> bool:
        return False

    async def init_standalone(self) -> None:
        self.rollout_mode = RolloutMode.STANDALONE  # no resource pool: nothing here needs a GPU
        await self.launch_servers()

    async def init_colocated(self, resource_pool: Any) -> None:
        self.rollout_mode = RolloutMode.COLOCATED
        await self.launch_servers()

    async def init_hybrid_colocated(self, worker_group: Any, resource_pool: Any) -> None:
        self.rollout_mode = RolloutMode.HYBRID
        await self.launch_servers()

    async def launch_servers(self) -> None:
        server = ray.remote(RolloutServiceServer).options(
            num_cpus=0, num_gpus=0, max_concurrency=self.max_concurrency
        ).remote(self.config, self.replica_rank, self.connection)
        self.servers = [server]
        self._server_handle = server
        # verl's load balancer keys servers by this address: one per replica.
        self._server_address = f"rollout-service://{self.connection.address}/replica-{self.replica_rank}{self.name_suffix}"
