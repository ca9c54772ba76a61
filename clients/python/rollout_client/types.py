"""Results as plain Python objects: lists of ids, numpy arrays of logprobs."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from rollout_client.proto.rollout.v1 import rollout_pb2 as pb

_FINISH = {pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_LENGTH: "length", pb.FINISH_REASON_ABORTED: "aborted"}


@dataclass
class Sample:
    """One sampled completion. `logprobs[i]` is the logprob of `token_ids[i]` under the distribution
    it was sampled from (float32)."""

    token_ids: list[int]
    text: str
    logprobs: np.ndarray
    # "stop", "length" or "aborted"; None for a piece of a sample still running (stream_tokens).
    finish_reason: str | None
    weight_version: int
    stop_reason: str = ""
    top_logprobs: list[dict[int, float]] = field(default_factory=list)
    # The version of the first token; differs from weight_version (the last token's) only when a
    # push was applied mid-sample under the "continue" policy.
    first_weight_version: int = 0
    # The version of every token as (version, count) runs in token order: one run unless a push
    # was applied mid-sample.
    token_weight_versions: list[tuple[int, int]] = field(default_factory=list)
    index: int = 0  # which of the prompt's n samples


@dataclass
class Completion:
    """The samples for one prompt (`prompt_index` into the request's batch)."""

    prompt_index: int
    prompt_token_ids: list[int]
    samples: list[Sample]
    request_id: str = ""
    prompt_logprobs: np.ndarray | None = None
    # Prompt tokens served from the engine's prefix cache (an earlier request shared the prefix).
    cached_prompt_tokens: int = 0


def _top(items) -> list[dict[int, float]]:
    return [dict(zip(t.token_ids, t.logprobs)) for t in items]


def completion_from_proto(c: pb.Completion) -> Completion:
    return Completion(
        prompt_index=c.prompt_index,
        prompt_token_ids=list(c.prompt_token_ids),
        samples=[
            Sample(
                token_ids=list(s.token_ids),
                text=s.text,
                logprobs=np.asarray(s.logprobs, dtype=np.float32),
                finish_reason=_FINISH.get(s.finish_reason),
                weight_version=s.weight_version,
                stop_reason=s.stop_reason,
                top_logprobs=_top(s.top_logprobs),
                first_weight_version=s.first_weight_version,
                token_weight_versions=[(r.version, r.count) for r in s.token_weight_versions],
                index=s.index,
            )
            for s in c.samples
        ],
        request_id=c.request_id,
        prompt_logprobs=np.asarray(c.prompt_logprobs, dtype=np.float32) if len(c.prompt_logprobs) else None,
        cached_prompt_tokens=c.cached_prompt_tokens,
    )


def joined(head: Sample, tail: Sample) -> Sample:
    """`head` continued by `tail` (a continuation generated from head's prompt + tokens): tokens,
    logprobs, alternatives and per-token versions of both, in order; the end is tail's. The text is
    the two texts joined (a character split across the boundary decodes as it did in each part)."""
    runs = list(head.token_weight_versions)
    for version, count in tail.token_weight_versions:
        if runs and runs[-1][0] == version:
            runs[-1] = (version, runs[-1][1] + count)
        else:
            runs.append((version, count))
    return Sample(
        token_ids=head.token_ids + tail.token_ids,
        text=head.text + tail.text,
        logprobs=np.concatenate([head.logprobs, tail.logprobs]).astype(np.float32),
        finish_reason=tail.finish_reason,
        weight_version=tail.weight_version if tail.token_ids else head.weight_version,
        stop_reason=tail.stop_reason,
        top_logprobs=head.top_logprobs + tail.top_logprobs,
        first_weight_version=head.first_weight_version if head.token_ids else tail.first_weight_version,
        token_weight_versions=runs,
    )
