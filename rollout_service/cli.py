"""`rollout-service` command line: serve, profile, setup, make-tiny-model; status, versions, rollback,
chat and mcp against a running service."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer
from pydantic import ValidationError
from rich.console import Console

from rollout_service import config_options
from rollout_service.config import LogprobsMode, Quantization, ServerConfig
from rollout_service.models.tiny import ARCHS as TINY_ARCHS
from rollout_service.quant.registry import FORMATS as QUANT_FORMATS
from rollout_service.tools.store_cli import app as store_app

app = typer.Typer(help="Rollout-as-a-service for LLM reinforcement learning.", no_args_is_help=True, add_completion=False)
app.add_typer(store_app, name="store")
err = Console(stderr=True, soft_wrap=True)  # one error per line, greppable


def _setup_logging(level: str, file: Path | None = None, log_format: str = "text") -> None:
    from rollout_service.observe import logs

    logs.setup(level, log_format, file)


def _config_error(exc: ValidationError) -> None:
    e = exc.errors(include_url=False)[0]
    flag = f"--{str(e['loc'][0]).replace('_', '-')}" if e["loc"] else ""
    if e["type"] == "missing":
        err.print(f"[red]error:[/red] {flag} is required (a flag, a --config file, ROLLOUT_{str(e['loc'][0]).upper()} or FLASHRL_CONFIG)")
    else:
        err.print(f"[red]error:[/red] {flag + ': ' if flag else ''}{e['msg']} (got {e.get('input')!r})")
    raise typer.Exit(2) from None


@app.command()
@config_options.with_field_options
def serve(
    ctx: typer.Context,
    config_file: Optional[Path] = typer.Option(None, "--config", help="YAML settings (as `setup` writes them, or FlashRL's config)."),
    no_http: bool = typer.Option(False, "--no-http", help="Serve gRPC only (http_port None).", rich_help_panel="Network"),
    log_level: Optional[str] = typer.Option(None, help="debug | info | warning | error (default info)."),
    **fields: Any,
) -> None:
    """Serve a model over gRPC and HTTP: on Ray Serve (engine replicas, a weight store; a local Ray
    cluster is started unless --ray-address is given), or with --backend local in this process.

    Unset options fall back to ROLLOUT_<NAME> environment variables, then FlashRL's (FLASHRL_CONFIG, FLASHRL_LMHEAD_FP32), then the --config file, then the defaults.

    Each option is a field of rollout_service/config.py, where its default and help are written.
    """
    from rollout_service import config_sources
    from rollout_service.errors import ConfigError

    given = config_options.given(ctx, fields)
    if no_http:
        given["http_port"] = None
    try:
        flash_level, flash_log_file = config_sources.flashrl_logging()
        from_file = config_sources.load_config_file(config_file) if config_file else {}
        config = ServerConfig(**config_sources.merge(given, from_file, config_sources.flashrl_settings()))
        _setup_logging(log_level or flash_level or "info", flash_log_file, config.log_format)
    except ConfigError as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    except ValidationError as exc:
        _config_error(exc)
    if config.tool_call_parser:
        from rollout_service.api.openai_compat.chat import check_tool_call_parser

        try:
            check_tool_call_parser(config.tool_call_parser)
        except ConfigError as exc:
            err.print(f"[red]error:[/red] --tool-call-parser: {exc}")
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


@app.command("make-key")
def make_key_cmd(
    role: str = typer.Argument(..., help="trainer | eval | admin."),
    append: Optional[Path] = typer.Option(None, "--append", help="Append the key's hashed line to this keys file."),
) -> None:
    """Print a new API key once; with --append, add its line (ROLE:sha256:HEX, the key itself not kept)
    to a keys file, which a running server re-reads."""
    import os

    from rollout_service.api.access import ROLES, digest, new_key

    if role not in ROLES:
        err.print(f"[red]error:[/red] role {role!r}: roles are {', '.join(ROLES)}")
        raise typer.Exit(2)
    key = new_key()
    if append is not None:
        # A file whose last line has no newline (echo -n, an editor) would get the new line glued
        # to its last key, revoking it.
        glue = append.is_file() and append.stat().st_size > 0 and not append.read_bytes().endswith(b"\n")
        fd = os.open(append, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)  # a new file: mode 600
        with os.fdopen(fd, "a") as f:
            f.write(("\n" if glue else "") + f"{role}:sha256:{digest(key)}\n")
        err.print(f"appended a {role} key to {append}; the key is shown once, below")
    print(key)


@app.command("profile")
def profile_cmd(
    model: Path = typer.Option(..., "--model", "-m", help="The bf16 checkpoint the trainer pushes."),
    quantized_model: Optional[Path] = typer.Option(
        None, "--quantized-model", "-qm", help="Its quantized counterpart (compressed-tensors, e.g. from llm-compressor)."
    ),
    output: Path = typer.Option(..., "--output", "-o", help="Where to write the profile (e.g. profile.pt)."),
    fn: Optional[str] = typer.Option(None, "--fn", help=f"{' | '.join(QUANT_FORMATS)}; required without -qm."),
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
    max_model_len: Optional[int] = config_options.option("max_model_len"),
    lm_head_fp32: bool = config_options.option("lm_head_fp32"),
    logprobs_mode: LogprobsMode = config_options.option("logprobs_mode"),
) -> None:
    """Write a service config (model, quantization, profile, engine settings) for `serve --config`."""
    import yaml

    from rollout_service.quant.recipe import Recipe

    try:
        recipe = Recipe.load(profile)
    except (FileNotFoundError, ValueError) as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    settings = {
        "model": str(model.resolve()), "quantization": recipe.fn, "profile": str(profile.resolve()),
        "dtype": ServerConfig.model_fields["dtype"].default, "logprobs_mode": logprobs_mode, "lm_head_fp32": lm_head_fp32,
    }
    if max_model_len is not None:
        settings["max_model_len"] = max_model_len
    try:
        ServerConfig(**settings)  # refuse to write what serve would refuse
    except ValidationError as exc:
        _config_error(exc)
    output.write_text(yaml.safe_dump(settings, sort_keys=False))
    err.print(f"wrote {output}; run: rollout-service serve --config {output}   (or FLASHRL_CONFIG={output})")


@app.command("estimate")
def estimate_cmd(
    params: Optional[str] = typer.Option(None, "--params", help="Parameter count, e.g. 32B (shapes of the nearest Qwen2.5)."),
    model: Optional[Path] = typer.Option(None, "--model", "-m", help="A checkpoint directory (exact shapes)."),
    quantization: Quantization = typer.Option("int8", help="Weight format (serve --quantization)."),
    gpu: str = typer.Option("h100", help="a100 | h100 | h200."),
    max_model_len: int = typer.Option(4096, help="Context length per sequence."),
    concurrency: int = typer.Option(64, help="Sequences whose KV cache must fit at once."),
    push_buffer_mib: int = config_options.option("push_buffer_mib"),
    gpu_memory_utilization: float = config_options.option("gpu_memory_utilization"),
    price: Optional[float] = typer.Option(None, help="USD per GPU-hour (default: the built-in table)."),
    json_out: bool = typer.Option(False, "--json", help="One JSON object instead of a table."),
) -> None:
    """Memory for weights, KV cache and staging; replicas per GPU (or GPUs per replica); rough $/hour."""
    import json

    from rich.table import Table

    from rollout_service.tools.estimate import GPUS, estimate, parse_params, shape_from_model, shape_from_params

    if (params is None) == (model is None):
        err.print("[red]error:[/red] give exactly one of --params and --model")
        raise typer.Exit(2)
    try:
        shape = shape_from_model(model) if model is not None else shape_from_params(parse_params(params))
        result = estimate(shape, quantization, gpu, max_model_len, concurrency, push_buffer_mib, gpu_memory_utilization, price)
        bf16 = estimate(shape, "none", gpu, max_model_len, concurrency, push_buffer_mib, gpu_memory_utilization, price)
    except ValueError as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    if json_out:
        print(json.dumps({**result.to_dict(), "bf16": bf16.to_dict()}))
        return
    table = Table(title=f"{result.source}: {max_model_len} tokens x {concurrency} sequences on {gpu}")
    for col in ("", quantization, "bf16"):
        table.add_column(col, justify="right")
    rows = [("weights", "weights_gib"), ("KV cache", "kv_cache_gib"), ("push staging", "staging_gib"),
            ("runtime reserve", "runtime_gib"), ("total", "total_gib")]
    for label, key in rows:
        table.add_row(label + " (GiB)", f"{getattr(result, key):.1f}", f"{getattr(bf16, key):.1f}")
    for label, key, fmt in (("GPUs per replica", "gpus_per_replica", "{}"), ("replicas per GPU", "replicas_per_gpu", "{}"),
                            ("USD per replica-hour", "usd_per_replica_hour", "{:.2f}")):
        table.add_row(label, fmt.format(getattr(result, key)), fmt.format(getattr(bf16, key)))
    Console().print(table)
    err.print(f"usable per GPU: {result.usable_gib_per_gpu:.1f} GiB ({gpu_memory_utilization:.0%} of {GPUS[gpu].memory_mib} MiB); "
              f"price {price if price is not None else GPUS[gpu].usd_per_hour} USD/GPU-hour (rough on-demand list price)")


@app.command("report")
def report_cmd(
    model: Optional[Path] = typer.Option(None, "--model", "-m", help="The bf16 checkpoint (servers are started for it)."),
    quantization: str = typer.Option("int8", help=f"{' | '.join(QUANT_FORMATS)}: the format to judge."),
    prompts: Optional[Path] = typer.Option(None, help="A text file, one prompt per line (default: a built-in set)."),
    output: Path = typer.Option(Path("report"), "--output", "-o", help="Directory for report.md, report.json, plots."),
    n: int = typer.Option(4, "-n", "--n", help="Samples per prompt."),
    max_tokens: int = typer.Option(32, help="Tokens per sample."),
    seed: int = typer.Option(0, help="Sampling seed."),
    tis_cap: float = typer.Option(2.0, help="TIS cap for the weight statistics."),
    max_model_len: int = typer.Option(1024, help="Context length of the servers started."),
    bf16_address: Optional[str] = typer.Option(None, help="Use this running bf16 server instead of starting one."),
    quant_address: Optional[str] = typer.Option(None, help="Use this running quantized server instead of starting one."),
) -> None:
    """Run the same prompts through a bf16 and a quantized server and write a markdown report:
    |Δlogprob| distribution, KL, greedy agreement, TIS weights, tokens/s ratio, histograms."""
    import functools
    import shlex
    import sys
    from contextlib import ExitStack

    from rollout_client import RolloutClient
    from rollout_service.tools.report import DEFAULT_PROMPTS, measure, write

    if quantization not in QUANT_FORMATS:
        err.print(f"[red]error:[/red] --quantization {quantization!r} is not one of {', '.join(QUANT_FORMATS)}")
        raise typer.Exit(2)
    if (bf16_address is None or quant_address is None) and (model is None or not (model / "config.json").is_file()):
        err.print(f"[red]error:[/red] --model {str(model)!r} is not a checkpoint directory (needed unless both addresses are given)")
        raise typer.Exit(2)
    if prompts is not None and not prompts.is_file():
        err.print(f"[red]error:[/red] --prompts {str(prompts)!r} does not exist")
        raise typer.Exit(2)
    lines = [x.strip() for x in prompts.read_text().splitlines() if x.strip()] if prompts else DEFAULT_PROMPTS
    if not lines:
        err.print(f"[red]error:[/red] --prompts {str(prompts)!r} has no prompts")
        raise typer.Exit(2)
    output.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        addresses = {"bf16": bf16_address, quantization: quant_address}
        missing = [k for k, v in addresses.items() if v is None]
        if missing:
            from rollout_service.launcher import ServerProcess, start_side_by_side

            def start(kind: str) -> ServerProcess:
                extra = [] if kind == "bf16" else ["--quantization", kind, "--cache-dir", str(output / ".cache")]
                return ServerProcess.start(model, output / f"server-{kind}.log", "--backend", "local", "--no-http",
                                           "--max-model-len", str(max_model_len), *extra)

            with err.status(f"starting {' and '.join(missing)} server(s) side by side (1-2 minutes; logs in {output})"):
                try:
                    started = start_side_by_side(stack, {k: functools.partial(start, k) for k in missing})
                except (RuntimeError, TimeoutError) as exc:
                    err.print(f"[red]error:[/red] a server did not start: {exc}")
                    raise typer.Exit(1) from None
            addresses.update((k, server.grpc_address) for k, server in started.items())
        bf16 = stack.enter_context(RolloutClient(addresses["bf16"], timeout=600))
        quant = stack.enter_context(RolloutClient(addresses[quantization], timeout=600))
        with err.status(f"sampling {len(lines)} prompts x {n} on the {quantization} server, scoring on bf16"):
            figures, data = measure(bf16, quant, lines, n=n, max_tokens=max_tokens, seed=seed, cap=tis_cap)
    title = f"{model.name if model else addresses['bf16']} in {quantization}"
    path = write(output, figures, data, title, "rollout-service " + " ".join(shlex.quote(a) for a in sys.argv[1:]))
    err.print(f"wrote {path}: mean |Δlogprob| {figures.mean_abs_dlogprob:.4f}, KL {figures.kl:.2e}, greedy identical "
              f"{figures.greedy_identical:.0%}, TIS clipped {figures.tis_clipped:.2%}, tokens/s ratio {figures.tokens_per_s_ratio:.2f}")


API_KEY = typer.Option(None, "--api-key", envvar="ROLLOUT_API_KEY", help="Key of a server run with --api-keys.")
ROOTS = typer.Option(None, "--root-certificates", help="CA (PEM) of a TLS server.")
CLIENT_CERT = typer.Option(None, "--client-certificate", help="This client's certificate (PEM), for mutual TLS.")
CLIENT_KEY = typer.Option(None, "--client-key", help="Its private key (PEM).")


def _connection(api_key: str | None, roots: Path | None, cert: Path | None, key: Path | None) -> dict:
    return {"api_key": api_key, "root_certificates": roots, "client_certificate": cert, "client_key": key}


@app.command("status")
def status_cmd(
    address: str = typer.Option("localhost:50051", "--address", "-a", help="The service's gRPC address."),
    interval: float = typer.Option(2.0, help="Seconds between the two readings that give the current tokens/s."),
    json_out: bool = typer.Option(False, "--json", help="One JSON object instead of a table."),
    api_key: Optional[str] = API_KEY,
    root_certificates: Optional[Path] = ROOTS,
    client_certificate: Optional[Path] = CLIENT_CERT,
    client_key: Optional[Path] = CLIENT_KEY,
) -> None:
    """Model, weight version, replicas, the last push and current throughput of a running service."""
    import json
    import time

    from google.protobuf.json_format import MessageToDict
    from rich.table import Table

    from rollout_client import RolloutClient, RolloutClientError

    try:
        with RolloutClient(address, timeout=10, **_connection(api_key, root_certificates, client_certificate, client_key)) as client:
            first, t0 = client.status(), time.monotonic()
            time.sleep(interval)
            second, t1 = client.status(), time.monotonic()
    except RolloutClientError as exc:
        err.print(f"[red]error:[/red] {address}: {exc}")
        raise typer.Exit(1) from None
    tokens_per_s = (second.counters.tokens_generated - first.counters.tokens_generated) / (t1 - t0)
    push = second.last_push if second.HasField("last_push") else None
    if json_out:
        print(json.dumps({**MessageToDict(second, preserving_proto_field_name=True), "tokens_per_s": tokens_per_s}))
        return
    table = Table(title=f"rollout-service at {address}", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    rows = [
        ("model", second.model),
        ("engine", f"{second.quantization}, {second.dtype}, logprobs {second.logprobs_mode}, vLLM {second.engine_version}"),
        ("weight version", f"{second.weight_version} served by every replica, {second.committed_version} committed"),
        ("replicas", f"{second.replicas}: " + ", ".join(f"{r[:8]} v{v}" for r, v in sorted(second.replica_versions.items()))),
        ("throughput", f"{tokens_per_s:.1f} tokens/s over {interval:g} s; {second.counters.requests_running} calls running"),
        ("since start", f"{second.counters.requests_total} calls, {second.counters.tokens_generated} tokens, "
                        f"{second.counters.requests_rejected_overload} rejected (overload), up {second.uptime_s:.0f} s"),
    ]
    if push is not None:
        gbps = push.bytes_received / push.receive_s / 1e9 if push.receive_s else 0.0
        rows.append(("last push", f"v{push.version} {push.label!r}: {push.tensors_applied} tensors, {push.bytes_received / 1e9:.3f} GB "
                                  f"received at {gbps:.2f} GB/s, apply {push.apply_s * 1e3:.0f} ms, paused {push.pause_ms:.0f} ms"))
    else:
        rows.append(("last push", "none yet"))
    for row in rows:
        table.add_row(*row)
    Console().print(table)


@app.command("versions")
def versions_cmd(
    address: str = typer.Option("localhost:50051", "--address", "-a", help="The service's gRPC address."),
    json_out: bool = typer.Option(False, "--json", help="A JSON list instead of a table."),
    api_key: str | None = API_KEY,
    root_certificates: Path | None = ROOTS,
    client_certificate: Path | None = CLIENT_CERT,
    client_key: Path | None = CLIENT_KEY,
) -> None:
    """The versions a running service's weight store keeps, newest first, with their labels and
    commit times: those `rollout-service rollback --to` takes."""
    import json
    import time

    from rich.table import Table

    from rollout_client import RolloutClient, RolloutClientError

    try:
        with RolloutClient(address, timeout=10, **_connection(api_key, root_certificates, client_certificate, client_key)) as client:
            versions = client.list_versions()
    except RolloutClientError as exc:
        err.print(f"[red]error:[/red] {address}: {exc}")
        raise typer.Exit(1) from None
    if json_out:
        fields = ("version", "label", "committed_at", "tensors", "bytes")  # numbers as numbers (proto JSON quotes uint64)
        print(json.dumps([{f: getattr(v, f) for f in fields} for v in versions]))
        return
    table = Table(title=f"versions kept at {address}{'' if versions else ': none (no push has committed)'}")
    for column in ("version", "label", "committed", "tensors", "MB"):
        table.add_column(column, justify="left" if column in ("label", "committed") else "right")
    for v in versions:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(v.committed_at))
        table.add_row(str(v.version), v.label, when, str(v.tensors), f"{v.bytes / 1e6:.1f}")
    Console(width=200).print(table)


@app.command("rollback")
def rollback_cmd(
    to: int = typer.Option(..., "--to", min=1, help="The kept version to serve again (see `rollout-service versions`)."),
    address: str = typer.Option("localhost:50051", "--address", "-a", help="The service's gRPC address."),
    expected_version: int | None = typer.Option(
        None, "--expected-version", min=0, help="Refuse unless this is the last committed version."
    ),
    api_key: str | None = API_KEY,
    root_certificates: Path | None = ROOTS,
    client_certificate: Path | None = CLIENT_CERT,
    client_key: Path | None = CLIENT_KEY,
) -> None:
    """Serve a kept version's weights again, as a new version (committed + 1; the versions between
    stay). Needs an admin key."""
    from rollout_client import RolloutClient, RolloutClientError

    try:
        with RolloutClient(address, timeout=600, **_connection(api_key, root_certificates, client_certificate, client_key)) as client:
            result = client.rollback(to, expected_version=expected_version)
    except RolloutClientError as exc:
        err.print(f"[red]error:[/red] {address}: {exc}")
        raise typer.Exit(1) from None
    print(f"version {result.version} ({result.label!r}) serves the weights of version {to}: "
          f"{result.tensors_applied} tensors, every replica loaded it in {result.apply_s:.1f} s")


@app.command("chat")
def chat_cmd(
    address: str = typer.Option("localhost:50051", "--address", "-a", help="The service's gRPC address."),
    max_tokens: int = typer.Option(64, help="Tokens per answer."),
    temperature: float = typer.Option(0.7, help="Sampling temperature (0 = greedy)."),
    show_logprobs: bool = typer.Option(True, "--logprobs/--no-logprobs", help="Colour each token by its probability."),
    api_key: Optional[str] = API_KEY,
    root_certificates: Optional[Path] = ROOTS,
    client_certificate: Optional[Path] = CLIENT_CERT,
    client_key: Optional[Path] = CLIENT_KEY,
) -> None:
    """Type prompts, read completions (each token coloured by its sampled probability) with the
    weight version that produced them. An empty line or Ctrl-D ends."""
    import math

    from rich.text import Text

    from rollout_client import RolloutClient, RolloutClientError

    out = Console()
    with RolloutClient(address, timeout=120, **_connection(api_key, root_certificates, client_certificate, client_key)) as client:
        try:
            status = client.status()
        except RolloutClientError as exc:
            err.print(f"[red]error:[/red] {address}: {exc}")
            raise typer.Exit(1) from None
        out.print(f"{status.model} ({status.quantization}) at version {status.weight_version}; empty line to quit")
        while True:
            try:
                prompt = input("> ")
            except EOFError:
                break
            if not prompt.strip():
                break
            try:
                sample = client.generate([prompt], max_tokens=max_tokens, temperature=temperature)[0].samples[0]
            except RolloutClientError as exc:
                err.print(f"[red]error:[/red] {exc}")
                continue
            text = Text()
            if show_logprobs:
                for tid, lp in zip(sample.token_ids, sample.logprobs.tolist()):
                    p = math.exp(lp)
                    text.append(f"{tid}:{p:.2f} ", style="green" if p > 0.5 else "yellow" if p > 0.1 else "red")
            out.print(sample.text)
            if show_logprobs:
                out.print(text)
            out.print(f"[dim]{len(sample.token_ids)} tokens, mean logprob {sample.logprobs.mean():.3f}, "
                      f"version {sample.weight_version}, {sample.finish_reason}[/dim]")


@app.command("mcp")
def mcp_cmd(
    address: str = typer.Option("localhost:50051", "--address", "-a", help="The service's gRPC address."),
    api_key: str | None = API_KEY,
    root_certificates: Path | None = ROOTS,
    client_certificate: Path | None = CLIENT_CERT,
    client_key: Path | None = CLIENT_KEY,
    bf16_address: str | None = typer.Option(
        None, "--bf16-address", help="A bf16 server of the same model, for the report tool (called with the same key and TLS).",
    ),
) -> None:
    """An MCP server on stdio for a coding agent: tools status, versions, rollback, generate and
    report, each calling the service with this key (the service enforces its role); no tool takes an
    address, so the key goes to the addresses given here only."""
    from rollout_service.tools.mcp_server import Bridge

    try:
        bridge = Bridge(address, _connection(api_key, root_certificates, client_certificate, client_key), bf16_address)
    except (ValueError, OSError) as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    try:
        bridge.server().run("stdio")
    finally:
        bridge.close()


@app.command("make-tiny-model")
def make_tiny_model_cmd(
    out_dir: Path = typer.Argument(..., help="Where to write the checkpoint."),
    seed: int = typer.Option(0, help="Weight init seed."),
    layers: int = typer.Option(4, help="Decoder layers."),
    hidden: int = typer.Option(256, help="Hidden size."),
    vocab: int = typer.Option(2048, help="Vocabulary size (the BPE tokenizer is padded to it)."),
    arch: str = typer.Option("qwen2", help="Model family (see README): " + ", ".join(TINY_ARCHS) + "."),
) -> None:
    """Write a random-init checkpoint of a model family with a real byte-level BPE tokenizer (no model hub needed)."""
    from rollout_service.models.tiny import TinyModelSpec, make_tiny_model

    try:
        spec = TinyModelSpec(layers=layers, hidden=hidden, vocab=vocab, seed=seed, arch=arch)
    except ValueError as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    with err.status(f"making a tiny model in {out_dir}"):
        path = make_tiny_model(out_dir, spec)
    err.print(f"wrote {path} ({arch}, {layers} layers, hidden {hidden}, vocab {vocab}, seed {seed})")


if __name__ == "__main__":
    app()
