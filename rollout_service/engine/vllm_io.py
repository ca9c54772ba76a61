"""Conversions between the service's types and vLLM's: sampling parameters in, outputs out."""

from __future__ import annotations

from array import array

from vllm import SamplingParams
from vllm.logprobs import FlatLogprobs
from vllm.outputs import CompletionOutput, RequestOutput
from vllm.sampling_params import RequestOutputKind

from rollout_service.types import Completion, FinishReason, Sample, SamplingOptions, TopLogprobs

_FINISH: dict[str | None, FinishReason] = {"stop": "stop", "length": "length", "abort": "aborted"}


def sampling_params(opts: SamplingOptions, stream: bool = False) -> SamplingParams:
    """vLLM parameters for `opts`. Logprobs are always requested: every sample returns them.
    `stream`: outputs come as the tokens new since the last one read (vLLM merges those a slow
    reader has not taken yet into one), else once, whole, when the sample finishes."""
    return SamplingParams(
        n=opts.n,
        max_tokens=opts.max_tokens,
        temperature=opts.temperature,
        top_p=opts.top_p,
        top_k=opts.top_k,
        min_p=opts.min_p,
        stop=list(opts.stop),
        stop_token_ids=list(opts.stop_token_ids),
        seed=opts.seed,
        ignore_eos=opts.ignore_eos,
        logprobs=opts.logprobs,
        prompt_logprobs=opts.prompt_logprobs,
        detokenize=opts.detokenize,
        skip_special_tokens=opts.skip_special_tokens,
        min_tokens=opts.min_tokens,
        repetition_penalty=opts.repetition_penalty,
        presence_penalty=opts.presence_penalty,
        frequency_penalty=opts.frequency_penalty,
        logit_bias=dict(opts.logit_bias) or None,
        allowed_token_ids=list(opts.allowed_token_ids) or None,
        output_kind=RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY,
        # One flat list per request instead of a dict per token: far less Python work per token.
        flat_logprobs=True,
    )


def _split(flat: FlatLogprobs, with_top: bool, first: int = 0) -> tuple[list[float], list[TopLogprobs]]:
    """Per position from `first` on: the chosen token's logprob (vLLM puts it first), and the top-k
    alternatives that follow it."""
    chosen = [flat.logprobs[s] for s in flat.start_indices[first:]]
    top: list[TopLogprobs] = []
    if with_top:
        for s, e in zip(flat.start_indices[first:], flat.end_indices[first:]):
            top.append(TopLogprobs(flat.token_ids[s + 1 : e], flat.logprobs[s + 1 : e]))
    return chosen, top


def _sample(out: CompletionOutput, with_top: bool, current_version: int) -> Sample:
    logprobs, top = _split(out.logprobs, with_top) if out.logprobs is not None else ([], [])
    stop_reason = out.stop_reason
    sample = Sample(
        token_ids=list(out.token_ids),
        text=out.text,
        logprobs=logprobs,
        finish_reason=None,
        weight_version=0,
        stop_reason="" if stop_reason is None else str(stop_reason),
        top_logprobs=top,
        index=out.index,
    )
    if out.finish_reason is None:  # a streamed piece: vLLM gives versions with the last one only
        return sample
    sample.finish_reason = _FINISH.get(out.finish_reason, "aborted")
    # vLLM labels each token with the weight version set when it was sampled (RolloutEngine sets
    # "0" at start and version + 1 at each push), as spans over all of the sample's tokens, also
    # in a streamed call. No tokens (aborted at once): no spans.
    spans = out.weight_versions or []
    sample.first_weight_version = int(spans[0].version) if spans else current_version
    sample.weight_version = int(spans[-1].version) if spans else current_version
    sample.token_weight_versions = [[int(span.version), span.end - span.start] for span in spans]
    return sample


def completion(
    index: int, out: RequestOutput, opts: SamplingOptions, request_id: str, current_version: int, first: bool = True
) -> Completion:
    """The service's Completion for prompt `index` from vLLM's final RequestOutput, or a piece of
    it from a streamed one (`first`: the prompt's first piece, the only one with its prompt);
    `current_version` labels samples that got no token."""
    samples = sorted(out.outputs, key=lambda o: o.index)
    result = Completion(
        prompt_index=index,
        # The prompt echoed back as an int32 array: a batch's finished completions wait for the
        # call's end, and as lists of Python ints their prompts would take 9x the request's size.
        prompt_token_ids=array("i", (out.prompt_token_ids or ()) if first else ()),
        samples=[_sample(o, opts.logprobs > 0, current_version) for o in samples],
        request_id=request_id,
        cached_prompt_tokens=(out.num_cached_tokens or 0) if first else 0,
    )
    if opts.prompt_logprobs is not None and out.prompt_logprobs is not None and first:
        # Position 0 has no logprob (nothing precedes the first prompt token).
        result.prompt_logprobs, result.prompt_top_logprobs = _split(
            out.prompt_logprobs, opts.prompt_logprobs > 0, first=1
        )
    return result
