"""`rollout-service` command line: serve, make-tiny-model."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import typer
from pydantic import ValidationError
from rich.console import Console

app = typer.Typer(help="Rollout-as-a-service for LLM reinforcement learning.", no_args_is_help=True, add_completion=False)
err = Console(stderr=True, soft_wrap=True)  # one error per line, greppable


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@app.command()
def serve(
    model: Path = typer.Option(..., "--model", "-m", help="Checkpoint directory (config.json, safetensors, tokenizer)."),
    quantization: Optional[str] = typer.Option(None, help="none | int8 | fp8 | fp8_channel (default none)."),
    dtype: Optional[str] = typer.Option(None, help="bfloat16 | float32 (default bfloat16)."),
    host: Optional[str] = typer.Option(None, help="Bind address (default 127.0.0.1)."),
    port: Optional[int] = typer.Option(None, help="gRPC port; 0 = a free port (default 50051)."),
    http_port: Optional[int] = typer.Option(None, help="HTTP port; 0 = a free port (default 8000)."),
    no_http: bool = typer.Option(False, "--no-http", help="Serve gRPC only."),
    max_model_len: Optional[int] = typer.Option(None, help="Context length (default: the model's)."),
    logprobs_mode: Optional[str] = typer.Option(None, help="processed (default) | raw."),
    lm_head_fp32: Optional[bool] = typer.Option(None, "--lm-head-fp32/--no-lm-head-fp32", help="LM head and logits in float32."),
    max_inflight_sequences: Optional[int] = typer.Option(None, help="In-flight sequence limit (default 1024)."),
    kv_cache_gib: Optional[int] = typer.Option(None, help="CPU KV cache in whole GiB (default 1)."),
    seed: Optional[int] = typer.Option(None, help="Engine seed (default 0)."),
    cache_dir: Optional[Path] = typer.Option(None, help="Where quantized copies of checkpoints are kept."),
    inflight: Optional[str] = typer.Option(None, help="drain (default) | abort | continue: running samples at a push."),
    push_buffer_mib: Optional[int] = typer.Option(None, help="Memory for pushed tensors in flight (default 256)."),
    staging_dir: Optional[Path] = typer.Option(None, help="Where pushed tensors are staged (default <cache-dir>/staging)."),
    debug_endpoints: Optional[bool] = typer.Option(None, "--debug-endpoints", help="Serve GET /v1/debug/engine-weights."),
    backend: Optional[str] = typer.Option(None, help="ray (default): Ray Serve replicas | local: one engine in this process."),
    ray_address: Optional[str] = typer.Option(None, help="Ray cluster to join (default: start a local one)."),
    replicas: Optional[int] = typer.Option(None, help="Engine replicas (default 1)."),
    autoscale: Optional[str] = typer.Option(None, help="MIN,MAX engine replicas, autoscaled on ongoing requests."),
    target_ongoing_requests: Optional[float] = typer.Option(None, help="Autoscaling target per replica (default 8)."),
    replica_cpus: Optional[float] = typer.Option(None, help="CPUs per engine replica (default 1)."),
    replica_gpus: Optional[float] = typer.Option(None, help="GPUs per engine replica (default 0)."),
    weights_dir: Optional[Path] = typer.Option(None, help="Weight store directory (default <cache-dir>/weights)."),
    keep_versions: Optional[int] = typer.Option(None, help="Versions the weight store keeps (default 3)."),
    redis_url: Optional[str] = typer.Option(None, help="Redis for version, registry, push lock, events (default: embedded)."),
    log_level: str = typer.Option("info", help="debug | info | warning | error."),
) -> None:
    """Serve a model over gRPC and HTTP: on Ray Serve (engine replicas, a weight store; a local Ray
    cluster is started unless --ray-address is given), or with --backend local in this process.

    Unset options fall back to ROLLOUT_<NAME> environment variables, then to the defaults.
    """
    from rollout_service.config import ServerConfig
    from rollout_service.errors import ConfigError

    _setup_logging(log_level)
    given = {k: v for k, v in locals().items() if k in ServerConfig.model_fields and v is not None}
    if no_http:
        given["http_port"] = None
    if autoscale is not None:
        given["autoscale"] = tuple(autoscale.split(",")) if "," in autoscale else autoscale
    try:
        config = ServerConfig(**given)
    except ValidationError as exc:
        e = exc.errors(include_url=False)[0]
        err.print(f"[red]error:[/red] --{str(e['loc'][0]).replace('_', '-')}: {e['msg']} (got {e.get('input')!r})")
        raise typer.Exit(2) from None
    if config.backend == "local":
        from rollout_service.server import run
    else:
        from rollout_service.serve.runner import run
    try:
        run(config)
    except ConfigError as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None


@app.command("make-tiny-model")
def make_tiny_model_cmd(
    out_dir: Path = typer.Argument(..., help="Where to write the checkpoint."),
    seed: int = typer.Option(0, help="Weight init seed."),
    layers: int = typer.Option(4, help="Decoder layers."),
    hidden: int = typer.Option(256, help="Hidden size."),
    vocab: int = typer.Option(2048, help="Vocabulary size (the BPE tokenizer is padded to it)."),
) -> None:
    """Write a random-init Qwen2 checkpoint with a real byte-level BPE tokenizer (no model hub needed)."""
    from rollout_service.models.tiny import TinyModelSpec, make_tiny_model

    try:
        spec = TinyModelSpec(layers=layers, hidden=hidden, vocab=vocab, seed=seed)
    except ValueError as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    with err.status(f"making a tiny model in {out_dir}"):
        path = make_tiny_model(out_dir, spec)
    err.print(f"wrote {path} ({layers} layers, hidden {hidden}, vocab {vocab}, seed {seed})")


if __name__ == "__main__":
    app()
