"""Every public call of RolloutClient and AsyncRolloutClient, written once.

Each call builds its requests, yields the steps that need the network or the clock (steps.py),
parses the replies and returns its result; client.py binds it as a method of the blocking client,
which carries each step out in place, and of the asyncio client, which awaits it. A call's first
parameter, `client`, is the method's `self` (client_base.ClientBase): the connection, the delta
base and what the client knows of the server.
"""

from __future__ import annotations

import sys
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from rollout_client import push
from rollout_client.client_base import ClientBase
from rollout_client.errors import DeadlineExceededError, DeltaBaseError, RolloutClientError
from rollout_client.proto.rollout.v1 import rollout_pb2 as pb
from rollout_client.push import PushResult
from rollout_client.steps import RUNNER_FRAMES, Push, Rpc, Sleep, Steps, StopStream, Stream
from rollout_client.types import Completion, Sample, completion_from_proto, joined

WAIT_POLL_S = 0.5
# wait_for_version's last status call may outlast its deadline by this much, rather than fail with
# a deadline too short to reach the server (its own DEADLINE_EXCEEDED would hide the version served).
MIN_STATUS_TIMEOUT_S = 1.0
# A push whose version some replicas load from the weight store (they failed to load the push)
# returns once they serve it, so the caller's next samples are of the version it pushed.
CATCH_UP_WAIT_S = 300.0
SAMPLING_FIELDS = tuple(f.name for f in pb.SamplingParams.DESCRIPTOR.fields)
# GenerateRequest fields the generate methods take among their keyword arguments, beside sampling's.
VERSION_FIELDS = ("min_weight_version", "max_staleness")


def build_request(
    prompts: Sequence[str] | None, prompt_token_ids: Sequence[Sequence[int]] | None, request_id: str, sampling: dict,
    session_id: str = "", stream_tokens: bool = False,
) -> pb.GenerateRequest:
    """A GenerateRequest from text prompts and/or token-id prompts plus SamplingParams fields, and
    the version fields: `min_weight_version` (sample only with this version or newer; the server
    holds the call until it serves it, within the call's deadline) and `max_staleness` (at most this
    many versions behind the newest committed one)."""
    versions = {k: sampling.pop(k) for k in VERSION_FIELDS if sampling.get(k) is not None}
    unknown = sorted(set(sampling) - set(SAMPLING_FIELDS))
    if unknown:
        raise TypeError(f"unknown sampling parameter(s) {unknown}; known: {list(SAMPLING_FIELDS)} and {list(VERSION_FIELDS)}")
    batch = [pb.Prompt(text=t) for t in prompts or ()]
    batch += [pb.Prompt(token_ids=ids) for ids in prompt_token_ids or ()]
    params = pb.SamplingParams(**{k: v for k, v in sampling.items() if v is not None})
    return pb.GenerateRequest(
        prompts=batch, sampling=params, request_id=request_id, session_id=session_id, stream_tokens=stream_tokens,
        **versions,
    )


def continuation(completion: Completion, sample: Sample, max_tokens: int, sampling: dict) -> dict | None:
    """The generate() arguments that continue an aborted `sample` from its tokens (resume()), or
    None when there is nothing to continue: it was not aborted, or has max_tokens tokens."""
    left = max_tokens - len(sample.token_ids)
    if sample.finish_reason != "aborted" or left <= 0:
        return None
    args = {**sampling, "prompt_token_ids": [completion.prompt_token_ids + sample.token_ids], "max_tokens": left, "n": 1}
    if args.get("min_tokens"):
        args["min_tokens"] = max(0, args["min_tokens"] - len(sample.token_ids))
    return args


def completions(response: pb.GenerateResponse) -> list[Completion]:
    return [completion_from_proto(c) for c in response.completions]


def generate(
    client: ClientBase, prompts: Sequence[str] | None = None, prompt_token_ids: Sequence[Sequence[int]] | None = None,
    *, request_id: str = "", session_id: str = "", timeout: float | None = None, **sampling,
) -> Steps[list[Completion]]:
    """One Completion per prompt, in order (text prompts first, then token-id prompts).

    Args:
        prompts: text prompts (the server tokenizes them).
        prompt_token_ids: prompts as token ids.
        request_id: an id of the caller's, echoed in every Completion; sent as the call's
            x-request-id too, it names the call in the server's log lines and traces.
        session_id: calls with the same one (the turns of one rollout) go to the same replica,
            which reuses its prefix cache.
        timeout: this call's deadline in seconds (default: the client's).
        **sampling: SamplingParams fields (n, max_tokens, temperature, ...), and
            min_weight_version / max_staleness (build_request).
    """
    request = build_request(prompts, prompt_token_ids, request_id, sampling, session_id)
    return completions((yield Rpc("Generate", request, timeout)))


def resume(
    client: ClientBase, completion: Completion, sample: Sample, *, max_tokens: int, timeout: float | None = None, **sampling
) -> Steps[Sample]:
    """Continue `sample` (one of `completion`'s, aborted by a push) from its tokens on the
    weights served now: one token-in call with the prompt + the sample's tokens, for the
    `max_tokens` the original call asked for less what it has (min_tokens likewise). Returns
    the whole sample (see types.joined): its per-token versions say which tokens came from
    which version. A sample that was not aborted is returned as it is. vLLM's presence and
    frequency penalties count the sample's tokens only from where the continuation starts.

    Args:
        completion: the Completion `sample` belongs to (its prompt tokens are sent again).
        sample: the aborted sample.
        max_tokens: the original call's max_tokens.
        timeout: this call's deadline in seconds (default: the client's).
        **sampling: the original call's sampling options (with another seed, or none, to draw
            fresh randomness); min_weight_version / max_staleness work as in generate().
    """
    args = continuation(completion, sample, max_tokens, sampling)
    if args is None:
        return sample
    (rest,) = yield from generate(client, **args, timeout=timeout)
    return joined(sample, rest.samples[0])


def generate_stream(
    client: ClientBase, prompts: Sequence[str] | None = None, prompt_token_ids: Sequence[Sequence[int]] | None = None,
    *, request_id: str = "", session_id: str = "", timeout: float | None = None, stream_tokens: bool = False,
    **sampling,
) -> Stream[Completion]:
    """Completions as each prompt finishes (see Completion.prompt_index). Stopping early cancels
    the call: the server aborts the prompts still running.

    Args:
        prompts, prompt_token_ids, request_id, session_id, timeout, **sampling: as in generate().
        stream_tokens: pieces of completions as their tokens are sampled instead: each holds the
            samples that advanced (Sample.index says which), with only their new tokens;
            finish_reason is None until a sample's last piece, which alone carries its weight
            versions (of all of its tokens); the prompt's fields come in its first piece.
    """
    request = build_request(prompts, prompt_token_ids, request_id, sampling, session_id, stream_tokens)
    return Stream("GenerateStream", request, timeout, completions)


def push_weights(
    client: ClientBase,
    weights: Mapping[str, Any] | Iterable[tuple[str, Any]],
    *,
    chunk_bytes: int = push.DEFAULT_CHUNK_BYTES,
    bucket_bytes: int = push.DEFAULT_BUCKET_BYTES,
    expected_version: int | None = None,
    label: str = "",
    inflight: str = "",
    progress: bool | None = None,
    timeout: float | None = None,
    delta: bool | None = None,
    shared_memory: bool | None = None,
) -> Steps[PushResult]:
    """Stream new weights into the server; returns once they serve as the new version (PushResult).
    Never retried: a push refused or failed before its commit changed nothing, but after a deadline
    or a lost connection it may have committed: read status().committed_version before pushing again.

    Args:
        weights: a state_dict, a dict of numpy/torch tensors, or an iterable of (name, tensor), e.g.
            a generator gathering sharded parameters one by one.
        chunk_bytes: the most bytes of a tensor one streamed message carries.
        bucket_bytes: tensors are declared and copied to host memory about this many bytes at a
            time, each group released once sent.
        expected_version: fail (FailedPrecondition) unless this is the last committed version.
        label: free text stored with the version (e.g. "step 120"), echoed in the result.
        inflight: "drain" | "abort" | "continue" for this push (default: the server's setting).
        progress: a byte progress bar (needs tqdm) and a one-line summary on stderr; by default
            only when stderr is a terminal.
        timeout: this push's deadline in seconds (default: the client's).
        delta: send each tensor this client's last delta push sent as its changes since then,
            against the version that push made (`delta_base`, one bf16 copy of the pushed tensors
            kept here: 2 bytes per parameter of host memory); float32/float16 torch tensors are cast
            to bfloat16 first, as the server casts them for a bf16 engine. The first such push sends
            everything whole. If the server no longer has that version, the push goes whole by
            itself, with a warning (`PushResult.fell_back` says why). The served weights are bitwise
            those of a push of the same tensors whole. By default (None) a push is a delta push
            whenever it streams to a server that takes them (another host: the bytes cross a link),
            and whole through shared memory; True: always (a warning where the server takes none);
            False: never. A push without deltas drops the copy (it no longer matches the server).
        shared_memory: hand the tensors over as files in the server's shared memory instead of
            streaming them (one copy, no serialization); by default whenever this process sees the
            server's directory (same host, same /dev/shm, same user); True: required (ValueError
            where it cannot be); False: always stream.
    """
    show = sys.stderr.isatty() if progress is None else progress
    start = time.perf_counter()
    served, needed = None, client._status_needed(delta, shared_memory)
    if needed:
        try:
            served = yield from status(client, timeout)
        except RolloutClientError:
            if needed == "required":
                raise
    plan, writer = client._push_setup(delta, shared_memory, served)
    options = dict(chunk_bytes=chunk_bytes, bucket_bytes=bucket_bytes, expected_version=expected_version, label=label,
                   inflight=inflight, progress=show, total=push.total_bytes(weights, plan is not None) if show else None)
    items, fell_back = push.items(weights), ""
    source = push.SourceErrors(push.requests(items, plan=plan, shared=writer, **options), writer)
    try:
        try:
            response = yield Push(source, timeout)
        except DeltaBaseError as exc:
            if plan is None:
                raise
            yield StopStream(source)  # gRPC's thread may still be taking tensors: let it finish first
            (plan, source), fell_back = client._whole_after(plan, exc, items, options, source), exc.details
            response = yield Push(source, timeout)
    except BaseException:
        if plan is not None:  # updated in place as far as the push went: no longer any version's
            yield StopStream(source)
            client.delta_base.clear()
        raise
    finally:
        source.close()
    if plan is not None:
        client.delta_base.version = response.version
    else:  # the copy matches no version this push leaves: free it (the next delta push goes whole)
        client.delta_base.clear()
    if response.replicas_catching_up:  # committed; the version is served once they have it
        try:
            yield from wait_for_version(client, response.version, timeout=CATCH_UP_WAIT_S)
        except RolloutClientError as exc:  # the push is committed: never fail it now
            _still_catching_up(response, exc)
    result = push.result_from_proto(response, time.perf_counter() - start, fell_back, stacklevel=4 + RUNNER_FRAMES)
    if show:
        print(result, file=sys.stderr)
    return result


def load_weights(
    client: ClientBase, url: str, *, expected_version: int | None = None, label: str = "", inflight: str = "",
    timeout: float | None = None,
) -> Steps[PushResult]:
    """Have the server read a safetensors checkpoint and serve it as the new version, as a push of
    the same tensors would (the same checks, requantization and all-or-nothing commit); returns
    once it serves (PushResult). Never retried, as a push is not (push_weights).

    Args:
        url: an object-store URL the server can read with its own credentials
            ("s3://bucket/step-120/"), or an absolute path under one of the server's load_dirs: a
            directory with model.safetensors.index.json (sharded) or model.safetensors, or one
            .safetensors file; tensors bfloat16/float16/float32, named as push_weights takes them.
        expected_version, label, inflight: as in push_weights.
        timeout: this call's deadline in seconds (default: the client's).
    """
    start = time.perf_counter()
    request = pb.LoadWeightsRequest(url=url, expected_version=expected_version, label=label, inflight=inflight)
    response = yield Rpc("LoadWeights", request, timeout)
    # The client's delta base is untouched: it is still the version its last delta push made,
    # which the server keeps while it is among its last keep_versions.
    if response.replicas_catching_up:
        try:
            yield from wait_for_version(client, response.version, timeout=CATCH_UP_WAIT_S)
        except RolloutClientError as exc:
            _still_catching_up(response, exc)
    return push.result_from_proto(response, time.perf_counter() - start, stacklevel=4 + RUNNER_FRAMES)


def rollback(
    client: ClientBase, to_version: int, *, expected_version: int | None = None, timeout: float | None = None,
) -> Steps[PushResult]:
    """Serve a kept version's weights again, as a new version (committed + 1, labelled
    "rollback to v<to_version>"; the versions between stay); returns once it serves (PushResult:
    its `version` is the new one, to give as the next push's expected_version). Needs an admin
    key. Never retried, as a push is not (push_weights): after a deadline it may have committed.

    Args:
        to_version: a version list_versions() lists (NotFoundError otherwise, naming those kept).
        expected_version: fail (FailedPrecondition) unless this is the last committed version.
        timeout: this call's deadline in seconds (default: the client's).
    """
    start = time.perf_counter()
    response = yield Rpc("Rollback", pb.RollbackRequest(to_version=to_version, expected_version=expected_version), timeout)
    # The client's delta base is untouched, as after a load: the version its last delta push made
    # is still kept (a rollback only adds a version), and a delta push names its base explicitly.
    if response.replicas_catching_up:
        try:
            yield from wait_for_version(client, response.version, timeout=CATCH_UP_WAIT_S)
        except RolloutClientError as exc:
            _still_catching_up(response, exc)
    return push.result_from_proto(response, time.perf_counter() - start, stacklevel=4 + RUNNER_FRAMES)


def status(client: ClientBase, timeout: float | None = None) -> Steps[pb.GetStatusResponse]:
    """Model, settings, current weight version, replicas and counters."""
    return (yield Rpc("GetStatus", pb.GetStatusRequest(), timeout))


def list_versions(client: ClientBase, timeout: float | None = None) -> Steps[list[pb.StoredVersion]]:
    """The committed versions the server's weight store keeps, newest first (version, label,
    committed_at, tensors, bytes): those a delta push may name as its base."""
    return list((yield Rpc("ListVersions", pb.ListVersionsRequest(), timeout)).versions)


def wait_for_version(
    client: ClientBase, version: int, timeout: float = 300.0, poll_s: float = WAIT_POLL_S
) -> Steps[pb.GetStatusResponse]:
    """Wait until the server serves weight version >= `version` (for example a version pushed
    by another process); returns that status. DeadlineExceededError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        served = yield from status(client, timeout=max(deadline - time.monotonic(), MIN_STATUS_TIMEOUT_S))
        if served.weight_version >= version:
            return served
        if time.monotonic() + poll_s > deadline:
            raise DeadlineExceededError(
                f"weight version {version} not served after {timeout:g} s (serving {served.weight_version})"
            )
        yield Sleep(poll_s)


def _still_catching_up(response: pb.PushWeightsResponse, exc: Exception) -> None:
    """The push is committed (its result says so and a fenced trainer must record it), but some
    replicas still load it: say so rather than fail."""
    warnings.warn(
        f"weight version {response.version} is committed, but replica(s) {list(response.replicas_catching_up)} "
        f"still load it from the weight store ({exc}); they serve older samples until then",
        stacklevel=3 + RUNNER_FRAMES,
    )
