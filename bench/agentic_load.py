"""Throughput under agentic load (many small concurrent calls): `vllm serve` vs the service, side by side.

Three servers on the same 8-layer hidden-1024 bf16 tiny model (.cache/agentic-8x1024), started one
after another and kept running; the loads run on one at a time (the others idle: an idle vLLM
engine sleeps, an idle Ray node takes a few hundredths of a core, shown per run in
`cores_by_role`), in interleaved rounds whose order rotates, so that the machine's drift (a VM
here: 10 % between runs an hour apart) falls on all alike; figures are medians over the rounds,
ratios the median of each round's ratio:

  vllm   `python -m vllm.entrypoints.openai.api_server` (VLLM_CPU_KVCACHE_SPACE=1): the reference
  local  `rollout-service serve --backend local` (one engine in the server's process)
  serve  `rollout-service serve` on Ray Serve (the default backend, default replica settings)
  serve2 the same with `--replicas 2` (not in the default --targets: on 2 cores its replicas share
         the cores with Ray and the ingress; run it to see how replicas scale on the machine's cores)

Load on the OpenAI routes: vLLM's own benchmark (`vllm.benchmarks.serve`, random dataset, 128 in /
128 out, --ignore-eos) over /v1/completions and /v1/chat/completions at concurrency 32, after a
warm-up run that is not counted; each further --concurrency value (full mode: 128 and 512) runs
once more on /v1/completions to count failed requests. Load on gRPC (local and serve): the same
prompts' shape as token ids, one prompt per Generate call, 32 calls in flight, through the
asyncio client (AsyncRolloutClient).

Figures: output tokens/s, its ratio to `vllm serve` on the same endpoint, TTFT / ITL / TPOT
percentiles, failed requests; gRPC: output tokens/s and call latency.

    python bench/agentic_load.py [--quick] [--json] [--targets vllm,local,serve]
                                 [--concurrency 32,128,512] [--num-prompts N] [--rounds N]
                                 [--endpoints completions,chat] [--no-grpc] [--profile DIR]

--quick: 64 prompts x 64 out, concurrency 32, one round (about 7 minutes); full: 128 x 128, two
rounds (under 20 minutes).
--profile DIR: py-spy samples the servers' processes during the OpenAI runs (functions by own time).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import CACHE, emit, machine  # noqa: E402

MODEL_DIR = CACHE / "agentic-8x1024"
SERVED_NAME = "agentic-8x1024"
WORK = CACHE / "agentic-bench"  # servers' cache dirs, weight stores, logs and vLLM's result files
TARGETS = ("vllm", "local", "serve", "serve2")
ENDPOINTS = {"completions": ("openai", "/v1/completions"), "chat": ("openai-chat", "/v1/chat/completions")}
INPUT_LEN = 128
# Ray's start plus the engine's take about 2 minutes here; twice that before calling it a failure.
START_TIMEOUT_S = 420
STOP_TIMEOUT_S = 90
# The failure-count runs at high concurrency send every request at once (request rate inf), so all
# of them are in flight together whatever their length; shorter outputs keep full mode under 20 min.
CHECK_OUTPUT_LEN = 16
WARMUP_PROMPTS = 4
# The measured rounds use seeds 0, 1, ...; the failure-count loads seed 0 (they count failures, and
# a prefix-cache hit changes none).
WARMUP_SEED = 1000
GRPC_CONCURRENCY = 32

# vLLM's benchmark as FACTS.md says: the `vllm` console script fails with vllm-cpu (no `vllm`
# distribution for importlib.metadata), its module works. main() is sync (asyncio.run inside).
BENCH_SNIPPET = (
    "import sys\n"
    "from vllm.utils.argparse_utils import FlexibleArgumentParser\n"
    "from vllm.benchmarks.serve import add_cli_args, main\n"
    "parser = FlexibleArgumentParser()\n"
    "add_cli_args(parser)\n"
    "main(parser.parse_args(sys.argv[1:]))\n"
)


def log(msg: str) -> None:
    print(f"[agentic_load {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---- the model ------------------------------------------------------------------------------------


def bench_model() -> Path:
    """The 8x1024 bf16 tiny model, made once with the CLI (as a user would) and cached."""
    if not (MODEL_DIR / "config.json").exists():
        log(f"making {MODEL_DIR}")
        subprocess.run([sys.executable, "-m", "rollout_service.cli", "make-tiny-model", "--layers", "8",
                        "--hidden", "1024", str(MODEL_DIR)], check=True, stdout=sys.stderr)
    return MODEL_DIR


# ---- servers --------------------------------------------------------------------------------------


class ServerFailed(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log_tail(path: Path, chars: int = 6000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else "(no log)"


@dataclass
class Server:
    """One server process (its own session, so that its whole tree can be stopped), logging to a file."""

    name: str
    proc: subprocess.Popen
    log_path: Path
    http_port: int
    grpc_port: int | None = None
    tree: set[int] = field(default_factory=set)  # every process it started, seen while it ran

    @property
    def grpc_address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def wait_ready(self, ready_line: str | None) -> None:
        """Poll GET /v1/models until 200 (and until `ready_line` is logged: the service's ingress may
        answer before its engine replica runs); the log's tail is raised with any failure."""
        deadline = time.monotonic() + START_TIMEOUT_S
        url = f"http://127.0.0.1:{self.http_port}/v1/models"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerFailed(f"{self.name} exited with {self.proc.returncode} before ready; log "
                                   f"{self.log_path} ends:\n{log_tail(self.log_path)}")
            logged = ready_line is None or ready_line in self.log_path.read_text(errors="replace")
            if logged and http_ok(url):
                self.tree |= descendants(self.proc.pid)
                return
            time.sleep(1)
        raise ServerFailed(f"{self.name} not ready after {START_TIMEOUT_S} s; log {self.log_path} ends:\n"
                           f"{log_tail(self.log_path)}")

    def stop(self) -> list[str]:
        """SIGTERM (the CLI stops Ray on it), the whole process group killed after STOP_TIMEOUT_S,
        then any process of its tree still alive (Ray's raylet and GCS may leave the group) killed
        by pid. Returns 'name(pid)' of those leftovers."""
        import psutil

        self.tree |= descendants(self.proc.pid)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                log(f"{self.name} still running {STOP_TIMEOUT_S} s after SIGTERM: killing its process group")
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        leftovers = []
        for pid in sorted(self.tree):
            try:
                p = psutil.Process(pid)
                if p.status() == psutil.STATUS_ZOMBIE:
                    continue
                leftovers.append(f"{p.name()}({pid})")
                p.terminate()
                try:
                    p.wait(10)
                except psutil.TimeoutExpired:
                    p.kill()
            except psutil.NoSuchProcess:
                pass
        if leftovers:
            log(f"{self.name}: processes left after it stopped, now stopped: {', '.join(leftovers)}")
        return leftovers


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status == 200
    except OSError:
        return False


def descendants(pid: int) -> set[int]:
    import psutil

    try:
        return {p.pid for p in psutil.Process(pid).children(recursive=True)}
    except psutil.NoSuchProcess:
        return set()


def launch(name: str, cmd: list[str], env_extra: dict[str, str], http_port: int, grpc_port: int | None = None) -> Server:
    log_path = WORK / f"{name}.log"
    env = {**os.environ, **env_extra}
    log(f"starting {name}: {' '.join(cmd)}")
    with open(log_path, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    return Server(name, proc, log_path, http_port, grpc_port)


def start_server(target: str, model: Path) -> Server:
    """Start `target` with its defaults except the context length (512 for all three), and wait until it serves."""
    from rollout_service.launcher import READY_PREFIX

    http_port = free_port()
    if target == "vllm":
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
               "--served-model-name", SERVED_NAME, "--host", "127.0.0.1", "--port", str(http_port),
               "--max-model-len", "512"]
        server = launch(target, cmd, {"VLLM_CPU_KVCACHE_SPACE": "1"}, http_port)
        ready = None
    else:
        grpc_port = free_port()
        # `python -m rollout_service.cli` is what the `rollout-service` script runs; it imports the
        # package from PYTHONPATH / the checkout this bench is run from (see the module docstring).
        cmd = [sys.executable, "-m", "rollout_service.cli", "serve", "--model", str(model),
               "--served-model-name", SERVED_NAME, "--port", str(grpc_port), "--http-port", str(http_port),
               "--max-model-len", "512", "--cache-dir", str(WORK / f"{target}-cache")]
        if target == "local":
            cmd += ["--backend", "local"]
        elif target == "serve2":
            cmd += ["--replicas", "2", "--weights-dir", tempfile.mkdtemp(prefix="weights-", dir=WORK)]
        else:  # a fresh weight store per run: a store left by an earlier run must not be resumed
            cmd += ["--weights-dir", tempfile.mkdtemp(prefix="weights-", dir=WORK)]
        server = launch(target, cmd, {}, http_port, grpc_port)
        ready = READY_PREFIX
    try:
        server.wait_ready(ready)
    except BaseException:
        server.stop()
        raise
    return server


OMP_PREFIX = re.compile(r"^.*?ompmultiprocessing\.py:\d+\]")


def omp_binding(log_path: Path) -> list[str]:
    """vLLM's 'OpenMP thread binding info' blocks from a server log (which cores its engine uses)."""
    lines = log_tail(log_path, 10**9).splitlines()
    found = []
    for i, line in enumerate(lines):
        if "OpenMP thread binding info" in line:
            # Under Ray each line carries the replica's prefix: pick the block's lines by their keys.
            keys = ("VLLM_CPU_OMP_THREADS_BIND", "local_world_size", "core ids", "reserved_cpus")
            block = [OMP_PREFIX.sub("", x).strip() for x in lines[i + 1:i + 6] if any(k in x for k in keys)]
            found.append(" | ".join(block))
    return found


# ---- where the cores go ---------------------------------------------------------------------------

# Roles by the process's title or command line (Ray and vLLM retitle their processes), first match.
ROLES = (
    ("engine worker (model)", ("VLLM::Worker",)),
    ("engine core (scheduler)", ("VLLM::EngineCore",)),
    ("engine replica (Serve)", ("ServeReplica:rollout:EngineReplica",)),
    ("ingress (Serve)", ("ServeReplica:rollout:Ingress",)),
    ("Ray (GCS, raylet, agents, controller)", ("gcs_server", "raylet", "ray::", "ray/dashboard", "ray/_private")),
    ("benchmark client", ("vllm.benchmarks.serve", "agentic_load.py")),
    ("server front end", ("vllm.entrypoints.openai.api_server", "rollout_service.cli")),
)


def role(proc) -> str:
    try:
        text = " ".join(proc.cmdline()) or proc.name()
    except Exception:  # noqa: BLE001 -- gone, or not ours to read
        return "other"
    return next((name for name, marks in ROLES if any(m in text for m in marks)), "other")


class CpuSplit:
    """CPU seconds per role over a run, from every process on the machine (psutil): which processes
    the 2 cores went to while the load ran."""

    def __enter__(self):
        self._start = self._times()
        self._wall = time.perf_counter()
        return self

    @staticmethod
    def _times() -> dict:
        import psutil

        out = {}
        for p in psutil.process_iter():
            try:
                t = p.cpu_times()
                out[p.pid] = (role(p), t.user + t.system)
            except Exception:  # noqa: BLE001 -- a process that ended meanwhile
                continue
        return out

    def __exit__(self, *exc):
        wall = time.perf_counter() - self._wall
        end = self._times()
        split: dict[str, float] = {}
        for pid, (name, cpu) in end.items():
            split[name] = split.get(name, 0.0) + cpu - self._start.get(pid, (name, 0.0))[1]
        self.cores = {name: round(cpu / wall, 2) for name, cpu in sorted(split.items(), key=lambda kv: -kv[1]) if cpu / wall >= 0.01}
        return False


class Profiles:
    """py-spy sampling the server's Python processes (its front end, Serve's ingress and engine
    replica, vLLM's engine core) while a run's load runs; each process's functions by own time go
    to DIR/<target>-<endpoint>-<role>-<pid>.txt (py-spy's collapsed stacks beside them)."""

    def __init__(self, out: str | None, server: Server, tag: str):
        self.out, self.server, self.tag, self.spies = out and Path(out), server, tag, []

    def __enter__(self):
        import psutil

        if self.out is None:
            return self
        self.out.mkdir(parents=True, exist_ok=True)
        pids = {self.server.proc.pid} | descendants(self.server.proc.pid)
        for pid in sorted(pids):
            try:
                name = role(psutil.Process(pid))
            except psutil.NoSuchProcess:
                continue
            if name in ("other", "Ray (GCS, raylet, agents, controller)", "benchmark client"):
                continue
            raw = self.out / f"{self.tag}-{'-'.join(name.split()[:2]).strip('()')}-{pid}.raw"
            spy = subprocess.Popen([str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(pid), "--rate", "50",
                                    "--format", "raw", "--output", str(raw), "--nonblocking"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            self.spies.append((spy, raw))
        time.sleep(1)  # py-spy attached
        return self

    def __exit__(self, *exc):
        for spy, raw in self.spies:
            spy.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
        for spy, raw in self.spies:
            try:
                spy.wait(60)
            except subprocess.TimeoutExpired:
                spy.kill()
            if raw.exists():
                raw.with_suffix(".txt").write_text(top_functions(raw))
        return False


def top_functions(raw: Path, n: int = 25) -> str:
    """The `n` functions with the most own samples in py-spy's collapsed stacks, and the share of
    samples under each of the top frames' functions (inclusive)."""
    own: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        frames = stack.split(";")
        total += int(count)
        own[frames[-1]] = own.get(frames[-1], 0) + int(count)
        for frame in set(frames):
            inclusive[frame] = inclusive.get(frame, 0) + int(count)
    lines = [f"{total} samples", "", "own time:"]
    lines += [f"{100 * c / total:5.1f}%  {f}" for f, c in sorted(own.items(), key=lambda kv: -kv[1])[:n]]
    lines += ["", "inclusive:"]
    lines += [f"{100 * c / total:5.1f}%  {f}" for f, c in sorted(inclusive.items(), key=lambda kv: -kv[1])[:n]]
    return "\n".join(lines) + "\n"


# ---- load on the OpenAI routes: vLLM's benchmark --------------------------------------------------


def vllm_bench(port: int, model: Path, endpoint: str, num_prompts: int, concurrency: int, output_len: int,
               tag: str, seed: int = 0) -> dict:
    """One run of vLLM's serving benchmark; returns the figures of its saved result JSON. A round's
    runs draw the same prompts (seed: the round) on every server, each round other ones: a round
    repeating the last one's prompts would start from the prefix cache."""
    backend, path = ENDPOINTS[endpoint]
    result = WORK / f"{tag}.json"
    result.unlink(missing_ok=True)
    cmd = [sys.executable, "-c", BENCH_SNIPPET,
           "--backend", backend, "--endpoint", path, "--host", "127.0.0.1", "--port", str(port),
           "--model", SERVED_NAME, "--tokenizer", str(model),
           "--dataset-name", "random", "--random-input-len", str(INPUT_LEN), "--random-output-len", str(output_len),
           "--num-prompts", str(num_prompts), "--max-concurrency", str(concurrency), "--ignore-eos", "--seed", str(seed),
           "--percentile-metrics", "ttft,tpot,itl", "--metric-percentiles", "50,90,99",
           "--disable-tqdm", "--save-result", "--result-dir", str(WORK), "--result-filename", result.name]
    with open(WORK / f"{tag}.bench.log", "w") as f:
        done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=1800)
    if done.returncode != 0 or not result.exists():
        raise RuntimeError(f"vLLM's benchmark ({tag}) exited with {done.returncode}; its log ends:\n"
                           f"{log_tail(WORK / f'{tag}.bench.log')}")
    r = json.loads(result.read_text())
    return {
        "output_tok_s": r["output_throughput"],
        "completed": r["completed"],
        "failed": r.get("failed", num_prompts - r["completed"]),
        "num_prompts": num_prompts,
        "concurrency": concurrency,
        "output_len": output_len,
        "duration_s": r["duration"],
        **{k: r.get(k) for k in ("median_ttft_ms", "p90_ttft_ms", "p99_ttft_ms", "median_itl_ms",
                                 "p99_itl_ms", "median_tpot_ms")},
    }


# ---- load on gRPC: the asyncio client -------------------------------------------------------------


def grpc_prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(20, 2000) for _ in range(INPUT_LEN)] for _ in range(n)]


async def grpc_load(address: str, prompts: list[list[int]], output_len: int, concurrency: int) -> dict:
    """One Generate per prompt, `concurrency` calls in flight, on one AsyncRolloutClient channel."""
    from rollout_client import AsyncRolloutClient

    latencies: list[float] = []
    tokens = failed = 0
    queue = list(prompts)

    async def worker(client: AsyncRolloutClient) -> None:
        nonlocal tokens, failed
        while queue:
            prompt = queue.pop()
            start = time.perf_counter()
            try:
                done = await client.generate(prompt_token_ids=[prompt], max_tokens=output_len, ignore_eos=True,
                                             temperature=1.0)
            except Exception as exc:  # noqa: BLE001 -- counted, as vLLM's benchmark counts a failed request
                failed += 1
                log(f"gRPC call failed: {exc!r}"[:300])
                continue
            latencies.append(time.perf_counter() - start)
            tokens += sum(len(s.token_ids) for c in done for s in c.samples)

    async with AsyncRolloutClient(address, timeout=600) as client:
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        wall = time.perf_counter() - start
    latencies.sort()
    return {
        "output_tok_s": tokens / wall,
        "completed": len(latencies),
        "failed": failed,
        "num_prompts": len(prompts),
        "concurrency": concurrency,
        "output_len": output_len,
        "duration_s": wall,
        "median_latency_ms": statistics.median(latencies) * 1e3 if latencies else None,
        "p90_latency_ms": latencies[int(0.9 * (len(latencies) - 1))] * 1e3 if latencies else None,
    }


# ---- one target, measured -------------------------------------------------------------------------


def start_target(target: str, model: Path, plan: dict) -> tuple[Server, dict]:
    """Start `target` and warm it: first calls compile and fill caches, so they are kept out (with
    other prompts, WARMUP_SEED, than the measured ones, which would otherwise start from the prefix
    cache)."""
    started = time.perf_counter()
    server = start_server(target, model)
    out: dict = {"start_s": round(time.perf_counter() - started, 1)}
    log(f"{target} ready in {out['start_s']} s")
    try:
        for endpoint in plan["endpoints"]:
            vllm_bench(server.http_port, model, endpoint, WARMUP_PROMPTS, WARMUP_PROMPTS, 16, f"{target}-warmup-{endpoint}", seed=WARMUP_SEED)
        if target != "vllm" and plan["grpc"]:
            asyncio.run(grpc_load(server.grpc_address, grpc_prompts(WARMUP_PROMPTS, seed=WARMUP_SEED), 16, WARMUP_PROMPTS))
    except BaseException:
        server.stop()
        raise
    return server, out


def measured_run(target: str, server: Server, model: Path, plan: dict, endpoint: str, rnd: int) -> dict:
    main_c = plan["concurrency"][0]
    with CpuSplit() as cpu, Profiles(plan.get("profile"), server, f"{target}-{endpoint}-r{rnd}"):
        r = vllm_bench(server.http_port, model, endpoint, plan["num_prompts"], main_c, plan["output_len"],
                       f"{target}-{endpoint}-c{main_c}-r{rnd}", seed=rnd)
    r["cores_by_role"] = cpu.cores  # mean cores busy per role while the load ran (idle servers' included)
    log(f"round {rnd + 1}: {target} {endpoint} c={main_c}: {r['output_tok_s']:.1f} tok/s, median TTFT "
        f"{r['median_ttft_ms']:.0f} ms, median ITL {r['median_itl_ms']:.1f} ms, failed {r['failed']}; cores busy by role {cpu.cores}")
    return r


def once_more(target: str, server: Server, model: Path, plan: dict, out: dict) -> None:
    """The failure counts at the further concurrencies, and the gRPC load."""
    for c in plan["concurrency"][1:]:
        n = max(c, plan["num_prompts"])
        r = vllm_bench(server.http_port, model, "completions", n, c, CHECK_OUTPUT_LEN, f"{target}-completions-c{c}")
        out[f"completions_c{c}"] = r
        log(f"{target} completions c={c} ({n} prompts x {CHECK_OUTPUT_LEN} out): {r['output_tok_s']:.1f} tok/s, "
            f"failed {r['failed']}")
    if target != "vllm" and plan["grpc"]:
        with CpuSplit() as cpu:
            r = asyncio.run(grpc_load(server.grpc_address, grpc_prompts(plan["num_prompts"]), plan["output_len"], GRPC_CONCURRENCY))
        r["cores_by_role"] = cpu.cores
        out["grpc"] = r
        log(f"{target} grpc c={GRPC_CONCURRENCY}: {r['output_tok_s']:.1f} tok/s, median latency "
            f"{r['median_latency_ms']:.0f} ms, p90 {r['p90_latency_ms']:.0f} ms, failed {r['failed']}")


def summary(runs: list[dict]) -> dict:
    """One endpoint's rounds as one figure each: medians over the rounds, the rounds' tok/s kept."""
    out = dict(runs[0])
    for key, value in runs[0].items():
        if isinstance(value, float) and all(isinstance(r.get(key), float) for r in runs):  # counts stay as run
            out[key] = statistics.median(r[key] for r in runs)
    out["failed"] = sum(r["failed"] for r in runs)
    out["rounds_tok_s"] = [round(r["output_tok_s"], 1) for r in runs]
    return out


def measure(targets: list[str], model: Path, plan: dict) -> tuple[dict, dict]:
    """Every target started (one after another) and kept running; the OpenAI loads in interleaved
    rounds (each round runs every target once, in an order rotated round to round), so that a
    drift of the machine's speed (a VM's: 10 % between runs an hour apart) falls on all targets
    alike; then the further concurrencies and gRPC; all stopped. Returns (figures per target,
    per-round ratios to vllm serve)."""
    servers: dict[str, Server] = {}
    results: dict[str, dict] = {}
    runs: dict[str, dict[str, list]] = {t: {e: [] for e in plan["endpoints"]} for t in targets}
    try:
        for target in targets:
            servers[target], results[target] = start_target(target, model, plan)
        for rnd in range(plan["rounds"]):
            order = targets[rnd % len(targets):] + targets[:rnd % len(targets)]
            for endpoint in plan["endpoints"]:
                for target in order:
                    runs[target][endpoint].append(measured_run(target, servers[target], model, plan, endpoint, rnd))
        for target in targets:
            once_more(target, servers[target], model, plan, results[target])
    finally:
        for target, server in servers.items():
            results[target]["leftover_processes"] = server.stop()
            results[target]["omp_binding"] = omp_binding(server.log_path)
            log(f"{target} stopped; OpenMP binding: {results[target]['omp_binding'] or 'not logged'}")
    per_round: dict[str, list[float]] = {}
    for target in targets:
        for endpoint, done in runs[target].items():
            results[target][endpoint] = summary(done)
            if target != "vllm" and "vllm" in runs:
                per_round[f"{target}_vs_vllm_{endpoint}"] = [
                    round(a["output_tok_s"] / b["output_tok_s"], 3) for a, b in zip(done, runs["vllm"][endpoint])
                ]
    if "serve" in runs and "serve2" in runs:
        for endpoint in plan["endpoints"]:
            per_round[f"serve2_vs_serve_{endpoint}"] = [
                round(a["output_tok_s"] / b["output_tok_s"], 3) for a, b in zip(runs["serve2"][endpoint], runs["serve"][endpoint])
            ]
    return results, per_round


# ---- report ---------------------------------------------------------------------------------------


def ratios(results: dict, per_round: dict) -> dict:
    """tok/s of local and serve / that of vllm, per endpoint (gRPC against vllm's /v1/completions),
    and of 2 Serve replicas / 1: for the OpenAI loads the median of the rounds' ratios (each
    round's targets ran minutes apart), for the others the ratio of the single runs."""
    base = results.get("vllm", {})
    out = {key: round(statistics.median(values), 3) for key, values in per_round.items() if values}
    for target in ("local", "serve", "serve2"):
        for key, r in results.get(target, {}).items():
            if not isinstance(r, dict) or "output_tok_s" not in r:
                continue
            ref = base.get("completions" if key == "grpc" else key)
            if ref and ref["output_tok_s"]:
                out.setdefault(f"{target}_vs_vllm_{key}", round(r["output_tok_s"] / ref["output_tok_s"], 3))
    one, two = results.get("serve", {}), results.get("serve2", {})
    for key, r in two.items():  # 2 replicas against 1
        if isinstance(r, dict) and isinstance(one.get(key), dict) and one[key].get("output_tok_s"):
            out.setdefault(f"serve2_vs_serve_{key}", round(r["output_tok_s"] / one[key]["output_tok_s"], 3))
    return out


def fmt(x, digits: int = 0) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


def table(results: dict, ratio: dict) -> str:
    rows = ["| target | endpoint | output tok/s | / vllm serve | median TTFT ms | p99 TTFT ms | median ITL ms | failed |",
            "|---|---|---:|---:|---:|---:|---:|---:|"]
    for target, figures in results.items():
        for key, r in figures.items():
            if not isinstance(r, dict) or "output_tok_s" not in r:
                continue
            shape = f"{r['num_prompts']} x {r['output_len']} out, c={r['concurrency']}"
            endpoint = "gRPC Generate" if key == "grpc" else ENDPOINTS[key.split("_")[0]][1]
            rel = "1" if target == "vllm" else fmt(ratio.get(f"{target}_vs_vllm_{key}"), 3)
            rows.append(f"| {target} | {endpoint} ({shape}) | {fmt(r['output_tok_s'], 1)} | {rel} | "
                        f"{fmt(r.get('median_ttft_ms'))} | {fmt(r.get('p99_ttft_ms'))} | {fmt(r.get('median_itl_ms'), 1)} | "
                        f"{r['failed']} |")
    notes = [f"gRPC {t}: median call latency {fmt(f['grpc']['median_latency_ms'])} ms, p90 {fmt(f['grpc']['p90_latency_ms'])} ms "
             "(whole calls: no TTFT/ITL; ratio against vllm serve's /v1/completions)"
             for t, f in results.items() if "grpc" in f]
    # The service streams whole choices (one chunk per prompt as it finishes, api/openai_compat/routes.py):
    # vLLM's benchmark then measures TTFT as the request's latency and ITL as 0.
    whole = sorted({t for t, f in results.items() for r in f.values()
                    if isinstance(r, dict) and r.get("median_itl_ms") == 0 and r.get("output_len", 0) > 1})
    if whole:
        notes.append(f"{', '.join(whole)}: each choice arrived in one chunk (ITL 0): TTFT there is the whole request's latency")
    return "\n".join(rows + [""] + notes)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="64 prompts x 64 out, concurrency 32 (about 7 minutes)")
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    parser.add_argument("--targets", default="vllm,local,serve", help="which servers to run, of vllm,local,serve,serve2")
    parser.add_argument("--concurrency", default=None,
                        help="comma list; the first is measured on both endpoints, each further one on /v1/completions "
                             "with max(it, num-prompts) prompts, for failure counts (default: 32 quick, 32,128,512 full)")
    parser.add_argument("--num-prompts", type=int, default=None, help="prompts per run (default: 64 quick, 128 full)")
    parser.add_argument("--endpoints", default=",".join(ENDPOINTS), help="OpenAI routes to load, of completions,chat")
    parser.add_argument("--no-grpc", action="store_true", help="skip the gRPC load")
    parser.add_argument("--rounds", type=int, default=None,
                        help="interleaved rounds of the OpenAI loads (default: 1 quick, 2 full); figures are medians")
    parser.add_argument("--profile", type=Path, default=None, metavar="DIR",
                        help="sample the servers' processes with py-spy during the OpenAI runs; functions by time into DIR "
                             "(the sampling costs the servers some throughput: not for the table)")
    args = parser.parse_args()
    args.targets = [t for t in args.targets.split(",") if t]
    if unknown := set(args.targets) - set(TARGETS):
        parser.error(f"unknown targets {sorted(unknown)}; choose from {TARGETS}")
    if unknown := set(args.endpoints.split(",")) - set(ENDPOINTS) - {""}:
        parser.error(f"unknown endpoints {sorted(unknown)}; choose from {list(ENDPOINTS)}")
    return args


def main() -> None:
    args = parse_args()
    plan = {
        # Quick: two waves of 32 calls, so calls still arrive while others run (an agent's load, not one batch).
        "num_prompts": args.num_prompts or (64 if args.quick else 128),
        "output_len": 64 if args.quick else 128,
        "concurrency": [int(c) for c in (args.concurrency or ("32" if args.quick else "32,128,512")).split(",")],
        "endpoints": [e for e in args.endpoints.split(",") if e],
        "grpc": not args.no_grpc,
        "rounds": args.rounds or (1 if args.quick else 2),
        "profile": str(args.profile) if args.profile else None,
    }
    WORK.mkdir(parents=True, exist_ok=True)
    model = bench_model()
    import rollout_service

    log(f"{machine()}; rollout_service from {Path(rollout_service.__file__).parent}; plan {plan}")
    began = time.perf_counter()
    try:
        results, per_round = measure(args.targets, model, plan)
    except ServerFailed as exc:
        log(str(exc))
        sys.exit(1)
    ratio = ratios(results, per_round)
    print("\n" + table(results, ratio), file=sys.stderr)
    log(f"done in {time.perf_counter() - began:.0f} s")
    if args.json:
        emit({"bench": "agentic_load", "machine": machine(), "command": shlex.join([sys.executable, *sys.argv]), "pythonpath": os.environ.get("PYTHONPATH", ""),
              "model": str(model), "served_model_name": SERVED_NAME, "input_len": INPUT_LEN, "plan": plan,
              "check_output_len": CHECK_OUTPUT_LEN, "grpc_concurrency": GRPC_CONCURRENCY,
              "rollout_service_path": str(Path(rollout_service.__file__).parent),
              "results": results, "ratios": ratio, "ratios_per_round": per_round, "wall_s": round(time.perf_counter() - began, 1)})


if __name__ == "__main__":
    main()
