"""`rollout-service` command line: serve, profile, setup, make-tiny-model."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import typer
from pydantic import ValidationError
from rich.console import Console

app = typer.Typer(help="Rollout-as-a-service for LLM reinforcement learning.", no_args_is_help=True, add_completion=False)
err = Console(stderr=True, soft_wrap=True)  # one error per line, greppable


def _setup_logging(level: str, file: Path | None = None) -> None:
    handlers = [logging.StreamHandler()] + ([logging.FileHandler(file)] if file else [])
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", handlers=handlers, force=True
    )


def _config_error(exc: ValidationError) -> None:
    e = exc.errors(include_url=False)[0]
    flag = f"--{str(e['loc'][0]).replace('_', '-')}" if e["loc"] else ""
    if e["type"] == "missing":
        err.print(f"[red]error:[/red] {flag} is required (a flag, a --config file, ROLLOUT_{str(e['loc'][0]).upper()} or FLASHRL_CONFIG)")
    else:
        err.print(f"[red]error:[/red] {flag + ': ' if flag else ''}{e['msg']} (got {e.get('input')!r})")
    raise typer.Exit(2) from None


@app.command()
def serve(
    model: Optional[Path] = typer.Option(None, "--model", "-m", help="Checkpoint directory (config.json, safetensors, tokenizer)."),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML settings (as `setup` writes them, or FlashRL's config)."),
    quantization: Optional[str] = typer.Option(None, help="none | int8 | fp8 | fp8_channel (default none)."),
    profile: Optional[Path] = typer.Option(None, help="Requantization recipe from `rollout-service profile`."),
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
    log_level: Optional[str] = typer.Option(None, help="debug | info | warning | error (default info)."),
) -> None:
    """Serve a model over gRPC and HTTP: on Ray Serve (engine replicas, a weight store; a local Ray
    cluster is started unless --ray-address is given), or with --backend local in this process.

    Unset options fall back to ROLLOUT_<NAME> environment variables, then FlashRL's (FLASHRL_CONFIG,
    FLASHRL_LMHEAD_FP32), then the --config file, then the defaults.
    """
    from rollout_service import config_sources
    from rollout_service.config import ServerConfig
    from rollout_service.errors import ConfigError

    given = {k: v for k, v in locals().items() if k in ServerConfig.model_fields and v is not None}
    if no_http:
        given["http_port"] = None
    if autoscale is not None:
        given["autoscale"] = tuple(autoscale.split(",")) if "," in autoscale else autoscale
    try:
        flash_level, flash_log_file = config_sources.flashrl_logging()
        _setup_logging(log_level or flash_level or "info", flash_log_file)
        from_file = config_sources.load_config_file(config) if config else {}
        settings = config_sources.merge(given, from_file, config_sources.flashrl_settings())
        config_obj = ServerConfig(**settings)
    except ConfigError as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    except ValidationError as exc:
        _config_error(exc)
    config = config_obj
    if config.backend == "local":
        from rollout_service.server import run
    else:
        from rollout_service.serve.runner import run
    try:
        run(config)
    except ConfigError as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None


@app.command("profile")
def profile_cmd(
    model: Path = typer.Option(..., "--model", "-m", help="The bf16 checkpoint the trainer pushes."),
    quantized_model: Optional[Path] = typer.Option(
        None, "--quantized-model", "-qm", help="Its quantized counterpart (compressed-tensors, e.g. from llm-compressor)."
    ),
    output: Path = typer.Option(..., "--output", "-o", help="Where to write the profile (e.g. profile.pt)."),
    fn: Optional[str] = typer.Option(None, "--fn", help="int8 | fp8 | fp8_channel; required without -qm."),
) -> None:
    """Record how pushed weights are requantized: which parameters are quantized, in which format,
    the ignore list — read from a quantized checkpoint (checked against the bf16 one), or derived
    from the bf16 model and --fn."""
    from rich.progress import Progress

    from rollout_service.quant.profile import ProfileError, profile

    try:
        with Progress(console=err, transient=True) as bar:
            task = bar.add_task("requantizing to compare", total=None)
            recipe, stats = profile(
                model, quantized_model, fn, progress=lambda i, n, name: bar.update(task, completed=i, total=n, description=name or "done")
            )
    except (ProfileError, FileNotFoundError) as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    recipe.save(output)
    err.print(f"wrote {output}: {recipe.fn}, {len(recipe.quantized or ())} quantized parameters, ignore {list(recipe.ignore)}")
    if stats is not None:
        err.print(
            f"requantizing the bf16 weights reproduces {stats.identical}/{stats.params} quantized parameters bit for bit"
            + (f"; worst {stats.worst_param}: {stats.worst_rel_diff:.2%} of its max |w| (the checkpoint was not made by "
               "round-to-nearest; pushes are requantized by round-to-nearest)" if stats.identical < stats.params else "")
        )


@app.command("setup")
def setup_cmd(
    model: Path = typer.Option(..., "--model", "-m", help="The checkpoint to serve: the quantized one, or the bf16 one."),
    profile: Path = typer.Option(..., "--profile", "-p", help="The profile `rollout-service profile` wrote."),
    output: Path = typer.Option(Path("rollout-config.yaml"), "--output", "-o", help="Where to write the service config."),
    max_model_len: Optional[int] = typer.Option(None, help="Context length (default: the model's)."),
    lm_head_fp32: bool = typer.Option(False, "--lm-head-fp32", help="LM head and logits in float32."),
    logprobs_mode: str = typer.Option("processed", help="processed | raw."),
) -> None:
    """Write a service config (model, quantization, profile, engine settings) for `serve --config`."""
    import yaml

    from rollout_service.config import ServerConfig
    from rollout_service.quant.recipe import Recipe

    try:
        recipe = Recipe.load(profile)
    except (FileNotFoundError, ValueError) as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    settings = {
        "model": str(model.resolve()), "quantization": recipe.fn, "profile": str(profile.resolve()),
        "dtype": "bfloat16", "logprobs_mode": logprobs_mode, "lm_head_fp32": lm_head_fp32,
    }
    if max_model_len is not None:
        settings["max_model_len"] = max_model_len
    try:
        ServerConfig(**settings)  # refuse to write what serve would refuse
    except ValidationError as exc:
        _config_error(exc)
    output.write_text(yaml.safe_dump(settings, sort_keys=False))
    err.print(f"wrote {output}; run: rollout-service serve --config {output}   (or FLASHRL_CONFIG={output})")


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
