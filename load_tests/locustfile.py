"""Locust load on a running rollout-service, on this machine only: trainers and evaluators at once.

- TrainerUser (gRPC): generates batches (8 prompts x n=2, 16 tokens, temperature 1) and, every
  --push-every seconds (0: never), pushes the model's own weights (its safetensors checkpoint).
  The interval is shared: one push at a time for all trainers, as one trainer process would.
- GrpcEvaluatorUser / HttpEvaluatorUser: small generates (1 prompt, 4 greedy tokens) over gRPC
  and over HTTP (POST /v1/generate).

Every call goes to locust's request event (request_type "grpc" / "http"; response_length = the
tokens generated, or the bytes pushed), so locust's statistics count failures. When locust quits,
every returned sample's weight versions are checked against the versions committed (the one served
at start, and each one a push reply returned): any other one fails the run (exit code 1), as does
any failed request. A summary JSON (requests, failures, p50/p99 ms per request type and per call,
tokens/s, pushes, versions seen) goes to --summary-json.

    locust -f load_tests/locustfile.py --headless -u 4 -r 4 --run-time 30s \
        --grpc-address 127.0.0.1:50051 --http-url http://127.0.0.1:8000 \
        --push-every 5 --weights .cache/tiny-model/model.safetensors --summary-json load.json

Bounded: --run-time is required, at most MAX_USERS users, at most --max-requests calls (then it
quits); one process (no --processes, --master or --worker: the version check needs every push and
sample in one place). Options can also come from environment variables (LOAD_PUSH_EVERY_S, ...).
`make load` (load_tests/run_load.py) starts a server and runs this with and without pushes.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import grpc.experimental.gevent

grpc.experimental.gevent.init_gevent()  # before any channel: locust runs its users on gevent

import gevent  # noqa: E402
import gevent.lock  # noqa: E402
import gevent.pool  # noqa: E402
import requests  # noqa: E402
from locust import User, between, constant, events, runners, task  # noqa: E402

from rollout_client import RolloutClient  # noqa: E402
from rollout_client.channel import NO_RETRY  # noqa: E402

from loopback import loopback_host  # noqa: E402  (this folder's modules)
from tally import PUSH, Tally  # noqa: E402

log = logging.getLogger("load")
MAX_USERS = 64
PUSH_JOIN_S = 120.0  # at the end, how long a push in flight may take to answer


@events.init_command_line_parser.add_listener
def _options(parser) -> None:
    group = parser.add_argument_group("rollout-service load")
    group.add_argument("--grpc-address", default="127.0.0.1:50051", env_var="ROLLOUT_GRPC_ADDRESS", help="server's gRPC host:port (loopback)")
    group.add_argument("--http-url", default="http://127.0.0.1:8000", env_var="ROLLOUT_HTTP_URL", help="server's HTTP URL (loopback)")
    group.add_argument("--api-key", default="", env_var="ROLLOUT_API_KEY", help="a trainer key, if the server has keys")
    group.add_argument("--push-every", type=float, default=0.0, env_var="LOAD_PUSH_EVERY_S", help="seconds between pushes; 0: none")
    group.add_argument("--weights", default="", env_var="LOAD_WEIGHTS", help="safetensors file to push (default: the served model's)")
    group.add_argument("--max-requests", type=int, default=2000, env_var="LOAD_MAX_REQUESTS", help="quit after this many calls")
    group.add_argument("--call-timeout", type=float, default=120.0, env_var="LOAD_CALL_TIMEOUT_S", help="deadline of each call, s")
    group.add_argument("--summary-json", default="", env_var="LOAD_SUMMARY_JSON", help="where to write the summary JSON")


class Run:
    """What the users share: the options, the weights to push and the client pushing them (its
    own channel: a trainer stopped mid-push closes its client, not this one), the
    one-push-at-a-time lock and the pushes in flight, the run's start and stop, and the tally
    (load_tests/tally.py)."""

    def __init__(self) -> None:
        self.environment = None
        self.options = None
        self.weights = None
        self.push_client: RolloutClient | None = None
        self.push_lock = gevent.lock.Semaphore()
        self.pushes = gevent.pool.Group()
        self.last_push = 0.0
        self.started = self.stopped = 0.0
        self.tally = Tally()


RUN = Run()


def _timed(user: User, request_type: str, name: str, call) -> None:
    """Run `call()` (-> (size, each sample's versions)) and report it to locust; exceptions
    become failures."""
    start = time.perf_counter()
    size, exc = 0, None
    try:
        size, versions = call()
        RUN.tally.add_samples(versions)
    except Exception as err:  # noqa: BLE001 (every failure is reported, none ends the user)
        exc = err
    user.environment.events.request.fire(
        request_type=request_type, name=name, response_time=(time.perf_counter() - start) * 1e3,
        response_length=size, exception=exc, context={},
    )


def _tokens_and_versions(samples) -> tuple[int, list[set[int]]]:
    return sum(len(s.token_ids) for s in samples), [{s.weight_version, s.first_weight_version} for s in samples]


class _GrpcUser(User):
    abstract = True

    def on_start(self) -> None:
        o = self.environment.parsed_options
        self.client = RolloutClient(o.grpc_address, timeout=o.call_timeout, retry=NO_RETRY, api_key=o.api_key or None)

    def on_stop(self) -> None:
        self.client.close()

    def generate(self, name: str, prompts: list[list[int]], **sampling) -> None:
        def call():
            completions = self.client.generate(prompt_token_ids=prompts, **sampling)
            return _tokens_and_versions([s for c in completions for s in c.samples])

        _timed(self, "grpc", name, call)


class TrainerUser(_GrpcUser):
    """Generates a batch, then pushes the weights when the shared interval is up."""

    weight = 2
    wait_time = constant(0)

    @task
    def rollout_and_maybe_push(self) -> None:
        prompts = [[(7 * i + 13 * p) % 1500 + 20 for i in range(16)] for p in range(8)]
        self.generate("trainer Generate 8x2", prompts, n=2, max_tokens=16, temperature=1.0)
        every = self.environment.parsed_options.push_every
        if every > 0 and time.monotonic() - RUN.last_push >= every and RUN.push_lock.acquire(blocking=False):
            try:  # in its own greenlet: a user stopped mid-push does not lose the version it commits
                RUN.pushes.spawn(self.push).get()
            finally:
                RUN.last_push = time.monotonic()
                RUN.push_lock.release()

    def push(self) -> None:
        def call():
            result = RUN.push_client.push_weights(RUN.weights, label="load test", progress=False, delta=False)
            RUN.tally.commit(result.version)
            return result.bytes_received, []

        _timed(self, "grpc", PUSH, call)


class GrpcEvaluatorUser(_GrpcUser):
    weight = 1
    wait_time = between(0.0, 0.2)

    @task
    def evaluate(self) -> None:
        self.generate("eval Generate 1x1", [[5, 17, 29, 41]], max_tokens=4, temperature=0.0)


class HttpEvaluatorUser(User):
    weight = 1
    wait_time = between(0.0, 0.2)

    def on_start(self) -> None:
        o = self.environment.parsed_options
        self.url = o.http_url.rstrip("/") + "/v1/generate"
        self.session = requests.Session()
        if o.api_key:
            self.session.headers["Authorization"] = f"Bearer {o.api_key}"
        self.timeout = o.call_timeout

    def on_stop(self) -> None:
        self.session.close()

    @task
    def evaluate(self) -> None:
        body = {"prompts": [{"token_ids": [5, 17, 29, 41]}], "sampling": {"max_tokens": 4, "temperature": 0.0}}

        def call():
            reply = self.session.post(self.url, json=body, timeout=self.timeout)
            if reply.status_code != 200:
                raise RuntimeError(f"HTTP {reply.status_code}: {reply.text[:300]}")
            samples = [s for c in reply.json()["completions"] for s in c["samples"]]
            return sum(len(s["token_ids"]) for s in samples), [{s["weight_version"], s["first_weight_version"]} for s in samples]

        _timed(self, "http", "eval /v1/generate 1x1", call)


@events.init.add_listener
def _init(environment, **_) -> None:
    RUN.environment = environment
    o = RUN.options = environment.parsed_options
    if isinstance(environment.runner, (runners.MasterRunner, runners.WorkerRunner)):
        raise SystemExit("load_tests/locustfile.py runs in one process (no --processes/--master/--worker)")
    if not o.run_time:
        raise SystemExit("--run-time is required: load tests are bounded in time")
    if (o.num_users or 0) > MAX_USERS:
        raise SystemExit(f"--users {o.num_users}: at most {MAX_USERS}")
    if o.max_requests < 1:
        raise SystemExit(f"--max-requests {o.max_requests} must be >= 1")
    loopback_host(o.grpc_address, "--grpc-address")
    loopback_host(o.http_url, "--http-url")
    if o.host:
        loopback_host(o.host, "--host")
    with RolloutClient(o.grpc_address, timeout=30, api_key=o.api_key or None) as client:
        status = client.status()
    RUN.tally.start(status.weight_version)
    if o.push_every > 0:
        from safetensors.torch import load_file

        path = Path(o.weights) if o.weights else Path(status.model) / "model.safetensors"
        if not path.is_file():
            raise SystemExit(f"--weights {str(path)!r}: no such safetensors file (pushes need the model's weights)")
        RUN.weights = load_file(path)
        RUN.push_client = RolloutClient(o.grpc_address, timeout=o.call_timeout, api_key=o.api_key or None)
    log.info("serving version %d; pushes %s", status.weight_version, f"every {o.push_every:g} s" if o.push_every > 0 else "off")


@events.test_start.add_listener
def _start(**_) -> None:
    RUN.started = RUN.last_push = time.monotonic()


@events.test_stop.add_listener
def _stop(**_) -> None:
    RUN.stopped = time.monotonic()


@events.request.add_listener
def _request(request_type, name, response_time, response_length, exception, **_) -> None:
    RUN.tally.add_request(request_type, name, response_time, response_length, exception is not None)
    if RUN.tally.requests == RUN.options.max_requests:
        log.info("--max-requests %d reached: quitting", RUN.options.max_requests)
        gevent.spawn(RUN.environment.runner.quit)


@events.quitting.add_listener
def _quitting(environment, **_) -> None:
    if RUN.options is None:
        return
    RUN.pushes.join(timeout=PUSH_JOIN_S)  # a push still answering may commit a version samples carry
    if RUN.push_client is not None:
        RUN.push_client.close()
    result = RUN.tally.summary((RUN.stopped or time.monotonic()) - RUN.started, RUN.options.push_every)
    if RUN.options.summary_json:
        Path(RUN.options.summary_json).write_text(json.dumps(result, indent=2) + "\n")
    if result["uncommitted_versions_seen"]:
        log.error(
            "samples carry weight versions %s that were never committed (committed: %s)",
            result["uncommitted_versions_seen"], result["committed_versions"],
        )
        environment.process_exit_code = 1
    log.info(
        "%d requests, %d failed, %.0f tokens/s, %d pushes, versions seen %s",
        result["requests"], result["failures"], result["tokens_per_s"], result["pushes"]["count"],
        sorted(int(v) for v in result["versions_seen"]),
    )
