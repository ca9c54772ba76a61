"""The one typed configuration of a rollout server.

Every field has a description; the CLI (`rollout-service serve`) and environment variables
(`ROLLOUT_<FIELD>`, e.g. `ROLLOUT_DTYPE=float32`) both fill it. Validated once, passed down.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Literal

from pydantic import Field, PrivateAttr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from rollout_service.errors import ConfigError
from rollout_service.quant.recipe import Recipe
from rollout_service.quant.registry import FORMATS, describe

Quantization = Literal[("none", *FORMATS)]  # type: ignore[valid-type]
DType = Literal["bfloat16", "float32"]
LogprobsMode = Literal["processed", "raw"]
InflightPolicy = Literal["drain", "abort", "continue"]
Backend = Literal["ray", "local"]


def is_loopback(host: str) -> bool:
    """Whether binding `host` keeps the server on this machine (a name other than localhost counts as not)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class ServerConfig(BaseSettings):
    """Settings of one rollout server (one vLLM engine behind gRPC and HTTP)."""

    model_config = SettingsConfigDict(env_prefix="ROLLOUT_", extra="forbid", frozen=True)

    model: Path = Field(description="Directory of a Hugging Face checkpoint: config.json, *.safetensors, tokenizer files.")
    quantization: Quantization = Field(
        "none",
        description=f"Weight format the engine runs: 'none' serves the checkpoint's own dtype; {describe()}.",
    )
    profile: Path | None = Field(
        None,
        description="Requantization recipe written by `rollout-service profile` (which parameters the "
        "quantized engine holds quantized, and how); default: every linear weight of the decoder layers. "
        "Needs quantization to be the profile's format.",
    )
    dtype: DType = Field("bfloat16", description="Activation and unquantized-weight dtype of the engine.")
    host: str = Field("127.0.0.1", description="Address the gRPC and HTTP servers bind to ('0.0.0.0' for all interfaces).")
    port: int = Field(50051, ge=0, le=65535, description="gRPC port; 0 picks a free port.")
    http_port: int | None = Field(
        8000, ge=0, le=65535, description="HTTP (FastAPI) port; 0 picks a free port; None disables HTTP."
    )
    max_model_len: int | None = Field(
        None, ge=2, description="Context length (prompt + generated tokens); default: the model's maximum."
    )
    logprobs_mode: LogprobsMode = Field(
        "processed",
        description="'processed': each returned logprob is that of the distribution the token was sampled "
        "from (after temperature, top-k, top-p, min-p), as importance sampling needs; 'raw': the model's "
        "unmodified log-softmax.",
    )
    lm_head_fp32: bool = Field(
        False, description="Compute the LM head and logits in float32 (FlashRL's FLASHRL_LMHEAD_FP32)."
    )
    max_inflight_sequences: int = Field(
        1024, ge=1, description="Most sequences (prompts x n) in the engine at once; a larger call runs in parts, and a call "
        "arriving while running + waiting sequences reach it gets RESOURCE_EXHAUSTED."
    )
    max_version_wait_s: float = Field(
        600.0, gt=0, description="Longest a call with a min_weight_version (or max_staleness) is held for its "
        "version to be served; then DEADLINE_EXCEEDED. The call's own deadline, if shorter, ends it first."
    )
    block_size: int | None = Field(
        None, ge=1, description="KV-cache block size in tokens (vLLM block_size). The prefix cache reuses whole "
        "blocks, so a multi-turn session's next turn recomputes up to a block of what the last turn computed; "
        "default: vLLM's (128 on CPU, 16 on GPU; CPU prefers multiples of 32)."
    )
    max_num_seqs: int = Field(256, ge=1, description="Most sequences the engine schedules in one step (vLLM max_num_seqs).")
    max_logprobs: int = Field(20, ge=0, description="Largest `logprobs` / `prompt_logprobs` a request may ask for.")
    served_model_name: str | None = Field(
        None, description="The model's name in the OpenAI-compatible endpoints (`model`, /v1/models); default: the "
        "checkpoint directory's name. Requests may also name the checkpoint path itself."
    )
    tool_call_parser: str | None = Field(
        None, description="vLLM's tool-call parser for /v1/chat/completions (e.g. hermes, llama3_json, qwen3_xml): "
        "tool calls in sampled text become `tool_calls`; default: none, the text is returned as it is."
    )
    kv_cache_gib: int = Field(
        1, ge=1, description="KV-cache size in whole GiB on CPU engines (VLLM_CPU_KVCACHE_SPACE takes an integer); ignored on GPU."
    )
    gpu_memory_utilization: float = Field(
        0.85, gt=0, le=1, description="Fraction of GPU memory the engine may use; ignored on CPU."
    )
    seed: int = Field(0, description="Engine seed for requests that set no seed of their own.")
    cache_dir: Path = Field(
        Path.home() / ".cache" / "rollout-service",
        description="Where quantized copies of checkpoints are kept (made once per checkpoint and format).",
    )

    inflight: InflightPolicy = Field(
        "drain",
        description="What a weight push does to samples being generated when it is applied: 'drain' lets "
        "them finish on the old weights first; 'abort' ends them with finish reason ABORTED (resubmit); "
        "'continue' carries them across: their keys and values are computed again on the new weights (a fresh "
        "prefill of prompt + tokens so far), so no token is sampled from KV of one version and weights of another; "
        "first_weight_version and token_weight_versions tell. A push may override it.",
    )
    push_buffer_mib: int = Field(
        256,
        ge=1,
        description="Memory for pushed tensors being received and converted; a push beyond it waits for "
        "conversions to catch up (a single tensor larger than it is still taken, alone).",
    )
    staging_dir: Path | None = Field(
        None,
        description="Where an int8/fp8 engine's requantized pushed tensors wait for the commit and are kept "
        "while served, and where a single-process server without weights_dir keeps its temporary weight "
        "store; default: <cache_dir>/staging.",
    )

    backend: Backend = Field(
        "ray",
        description="'ray': a Ray Serve application (engine replicas behind one ingress, pushes applied to "
        "every replica or none, a weight store); 'local': one engine in this process, no Ray.",
    )
    ray_address: str | None = Field(
        None, description="Ray cluster to join ('auto', 'ray://host:10001'); default: start a local one."
    )
    replicas: int = Field(1, ge=1, description="Engine replicas when not autoscaling.")
    autoscale: tuple[int, int] | None = Field(
        None, description="(min, max) engine replicas; Serve adds replicas when ongoing requests per replica "
        "exceed target_ongoing_requests. Overrides replicas."
    )
    target_ongoing_requests: float = Field(
        8.0, gt=0, description="Autoscaling target: Generate calls in flight per replica."
    )
    replica_cpus: float = Field(1.0, gt=0, description="CPUs Ray reserves for each engine replica (fractions allowed).")
    replica_gpus: float = Field(0.0, ge=0, description="GPUs Ray reserves for each engine replica.")
    weights_dir: Path | None = Field(
        None,
        description="Weight store: every committed version as safetensors shards + manifest.json, where "
        "late replicas and a restarted server load the current version from (shared storage across "
        "nodes); bound to the model's checkpoint. Ray Serve's default: <cache_dir>/weights/<model>-<checkpoint "
        "id>. The single-process server keeps and resumes versions only when it is set (otherwise its store is "
        "temporary and a restart starts from the checkpoint).",
    )
    keep_versions: int = Field(
        3, ge=2, description="Versions the weight store keeps (older ones are deleted; at least 2: a load that "
        "fails puts back the previous version's tensors)."
    )
    redis_url: str | None = Field(
        None,
        description="Redis holding the current version, the replica registry, the push lock and the "
        "version event stream (redis://host:6379/0); default: the same kept in the ingress process.",
    )

    redis_password_file: Path | None = Field(
        None, description="File holding the Redis password (kept out of redis_url, argv and logs)."
    )

    debug_endpoints: bool = Field(
        False,
        description="Serve GET /v1/debug/engine-weights (the engine's weights as it computes with them, "
        "safetensors, for checking that pushes land) and POST /v1/debug/pause, /v1/debug/resume (hold "
        "generation, e.g. to freeze work in flight in a test). Off by default: the first copies the whole "
        "model, the others stop generation for every client.",
    )

    api_keys: Path | None = Field(
        None,
        description="File of API keys, one a line as ROLE:KEY or ROLE:sha256:HEX, roles trainer (generate, push, "
        "status), eval (generate, status), admin (everything); re-read when it changes (`rollout-service make-key`). "
        "Without it every caller may do everything, so the server binds only to a loopback address unless "
        "insecure is set.",
    )
    insecure: bool = Field(
        False, description="Allow a non-loopback host without api_keys: anyone who reaches the port can push weights."
    )
    tls_cert: Path | None = Field(None, description="PEM certificate (chain) of the server: gRPC and HTTP serve TLS.")
    tls_key: Path | None = Field(None, description="PEM private key of tls_cert.")
    tls_client_ca: Path | None = Field(
        None, description="PEM CA bundle; when set, clients must present a certificate it signed (mutual TLS)."
    )
    max_prompts_per_call: int = Field(
        65536, ge=1, description="Most prompts in one Generate call (the verl plugin sends batch x n rows as prompts)."
    )
    max_samples_per_call: int = Field(65536, ge=1, description="Most samples (prompts x n) in one Generate call.")
    max_prompt_tokens: int | None = Field(
        None, ge=1, description="Longest prompt in tokens; default: the context's (the engine refuses a prompt that "
        "leaves no room to generate, naming max_model_len)."
    )
    max_tokens_per_sample: int | None = Field(
        None, ge=1, description="Largest sampling.max_tokens; default: none beyond the context (generation stops "
        "at its end)."
    )
    max_request_mib: int = Field(
        64, ge=1, description="Largest HTTP request body and gRPC message, MiB (pushes: max_push_mib); gRPC always "
        "takes at least 16 MiB, the clients' push chunks being 4 MiB. 64 MiB holds about 20 million prompt tokens."
    )
    max_request_mib_per_key: int = Field(
        512, ge=1, description="Generate request bytes one API key may have in flight at once, MiB (their size on the "
        "wire, counted before they are parsed; parsed, a request takes up to about 8x it over gRPC and 3x as JSON): "
        "RESOURCE_EXHAUSTED beyond, so a key's calls cannot take more memory than this grants, however many it sends."
    )
    max_push_mib: int | None = Field(
        None, ge=1, description="Largest push (declared tensor bytes, and an HTTP push body), MiB; default: the "
        "model at float32, twice (a tied LM head sent separately, float32 extras)."
    )
    max_concurrent_generates_per_key: int = Field(
        1024, ge=1, description="Generate calls one API key may have running at once (RESOURCE_EXHAUSTED beyond)."
    )
    shared_memory: bool = Field(
        True, description="Let clients on this host hand pushed tensors over as files in shared memory instead of "
        "streaming them (the clients do it when they find the server's directory; off: every client streams)."
    )
    shared_memory_dir: Path = Field(
        Path("/dev/shm"), description="Where the server makes its shared-memory directory (a tmpfs: the files are "
        "memory; each is deleted once taken)."
    )
    push_idle_timeout_s: float = Field(
        120.0, gt=0, description="A push whose sender sends nothing this long is aborted (DEADLINE_EXCEEDED / 504) "
        "and nothing of it applied, so a silent client cannot hold the push lock."
    )
    max_concurrent_pushes_per_key: int = Field(
        4, ge=1, description="Pushes one API key may have open at once (RESOURCE_EXHAUSTED beyond)."
    )

    def check_secret_files(self) -> None:
        """The keys, TLS and Redis password files exist. Checked where they are read (the server, the
        Serve runner and ingress), not in the validator: Serve builds the app from this config on any
        node, and the files may be mounted on the head node only."""
        for name in ("api_keys", "tls_cert", "tls_key", "tls_client_ca", "redis_password_file"):
            path = getattr(self, name)
            if path is not None and not path.is_file():
                raise ConfigError(f"{name}={str(path)!r} is not a file")

    @model_validator(mode="after")
    def _exposure(self) -> ServerConfig:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together: give both or neither")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("tls_client_ca needs tls_cert and tls_key (client certificates are checked over TLS)")
        if self.max_request_mib > self.max_request_mib_per_key:
            raise ValueError(
                f"max_request_mib={self.max_request_mib} is above max_request_mib_per_key={self.max_request_mib_per_key}: "
                "the largest request could never be taken"
            )
        if self.api_keys is None and not self.insecure and not is_loopback(self.host):
            raise ValueError(
                f"host={self.host!r} is not a loopback address, and without api_keys anyone who reaches it can push "
                "weights: give --api-keys FILE (rollout-service make-key), or --insecure to serve it open"
            )
        return self

    @field_validator("autoscale")
    @classmethod
    def _autoscale_range(cls, value: tuple[int, int] | None) -> tuple[int, int] | None:
        if value is not None and not (0 <= value[0] <= value[1] and value[1] >= 1):
            raise ValueError(f"autoscale={value}: need 0 <= min <= max and max >= 1")
        return value

    # The recipe, loaded once by the validator below (startup, the weight service and every
    # replica ask for it).
    _recipe: Recipe | None = PrivateAttr(None)

    @property
    def model_name(self) -> str:
        """The name the OpenAI-compatible endpoints serve the model under."""
        return self.served_model_name or self.model.name

    @model_validator(mode="after")
    def _load_recipe(self) -> ServerConfig:
        if self.profile is not None:
            recipe = Recipe.load(self.profile)  # a bad file is reported here, at start
            if recipe.fn != self.quantization:
                raise ValueError(f"profile={str(self.profile)!r} is for {recipe.fn}, but quantization={self.quantization!r}")
            self._recipe = recipe
        elif self.quantization != "none":
            self._recipe = Recipe(fn=self.quantization, source="default rule")
        return self

    def recipe(self) -> Recipe | None:
        """How the engine holds its parameters; None when it is not quantized."""
        return self._recipe

    @property
    def staging_root(self) -> Path:
        return self.staging_dir or self.cache_dir / "staging"

    @field_validator("model")
    @classmethod
    def _model_exists(cls, path: Path) -> Path:
        if not (path / "config.json").is_file():
            raise ValueError(f"model={str(path)!r} is not a checkpoint directory (no config.json)")
        return path.absolute()  # replicas may run elsewhere than the working directory
