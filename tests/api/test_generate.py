"""Generate / GenerateStream / GetStatus / health / reflection against a real bf16 engine."""

from __future__ import annotations

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.observe import InBackground, held, wait_until

pytestmark = pytest.mark.engine


def test_same_seed_same_request_gives_same_tokens(bf16_server, bf16_client):
    kwargs = dict(n=3, max_tokens=16, temperature=1.0, seed=1234, ignore_eos=True)

    def in_one_batch():
        """The call's 3 samples start in one engine step, as kernels round by batch shape: held
        until all 3 are in the engine."""
        with held(bf16_server):
            call = InBackground(lambda: bf16_client.generate(["The policy samples"], **kwargs))
            wait_until(lambda: bf16_client.status().counters.engine_requests_running == 3, "3 samples in the engine")
        return call.outcome()

    a, b = in_one_batch(), in_one_batch()
    assert [s.token_ids for s in a[0].samples] == [s.token_ids for s in b[0].samples]
    assert all((x.logprobs == y.logprobs).all() for x, y in zip(a[0].samples, b[0].samples))


def test_different_seeds_give_different_samples(bf16_client):
    kwargs = dict(max_tokens=16, temperature=1.0, ignore_eos=True)
    a = bf16_client.generate(["The policy samples"], seed=1, **kwargs)[0].samples[0].token_ids
    b = bf16_client.generate(["The policy samples"], seed=2, **kwargs)[0].samples[0].token_ids
    assert a != b


def test_n_samples_per_prompt_in_prompt_order(bf16_client):
    out = bf16_client.generate(["one", "two words", "three words here"], n=4, max_tokens=8, temperature=1.0, seed=5)
    assert [c.prompt_index for c in out] == [0, 1, 2]
    for c in out:
        assert len(c.samples) == 4
        for s in c.samples:
            assert 1 <= len(s.token_ids) <= 8
            assert len(s.logprobs) == len(s.token_ids)
            assert (s.logprobs <= 0).all()
            assert s.weight_version == 0
            assert s.finish_reason in ("stop", "length")


def test_text_and_token_id_prompts_agree(bf16_client):
    by_text = bf16_client.generate(["Every replica loads"], max_tokens=8, temperature=0.0)[0]
    by_ids = bf16_client.generate(prompt_token_ids=[by_text.prompt_token_ids], max_tokens=8, temperature=0.0)[0]
    assert by_ids.samples[0].token_ids == by_text.samples[0].token_ids


def test_max_tokens_ends_with_length_and_stop_token_with_stop(bf16_client):
    s = bf16_client.generate(["The trainer"], max_tokens=5, temperature=0.0, ignore_eos=True)[0].samples[0]
    assert len(s.token_ids) == 5 and s.finish_reason == "length"
    stop_at = s.token_ids[2]
    t = bf16_client.generate(["The trainer"], max_tokens=5, temperature=0.0, stop_token_ids=[stop_at])[0].samples[0]
    assert t.finish_reason == "stop" and t.token_ids[-1] == stop_at
    assert t.stop_reason == str(stop_at)


def test_top_logprobs_and_prompt_logprobs(bf16_client):
    c = bf16_client.generate(["The trainer computes"], max_tokens=6, temperature=0.8, logprobs=3, prompt_logprobs=2, seed=0)[0]
    s = c.samples[0]
    assert len(s.top_logprobs) == len(s.token_ids)
    for top, tok, lp in zip(s.top_logprobs, s.token_ids, s.logprobs):
        assert len(top) == 3
        assert max(top.values()) >= lp - 1e-6  # the best alternative is at least as likely as the sample
        if tok in top:
            assert top[tok] == pytest.approx(lp)
    assert c.prompt_logprobs is not None and len(c.prompt_logprobs) == len(c.prompt_token_ids) - 1


def test_stream_returns_every_completion_exactly_once(bf16_client):
    lengths = [1, 12, 3, 7, 2]
    prompts = [[5 + i] * 3 for i in range(len(lengths))]
    seen = []
    for c in bf16_client.generate_stream(prompt_token_ids=prompts, max_tokens=12, temperature=0.0, ignore_eos=True):
        seen.append(c.prompt_index)
        assert len(c.samples) == 1
    assert sorted(seen) == list(range(len(lengths)))


def test_a_token_stream_sends_pieces_that_add_up_to_the_whole_completions(bf16_client):
    prompts, args = [[5, 6, 7], [8, 9]], dict(n=2, max_tokens=8, temperature=1.0, seed=11, logprobs=2, ignore_eos=True)
    whole = bf16_client.generate(prompt_token_ids=prompts, **args)
    pieces = list(bf16_client.generate_stream(prompt_token_ids=prompts, stream_tokens=True, **args))
    assert len(pieces) > len(prompts)
    for c in whole:
        mine = [p for p in pieces if p.prompt_index == c.prompt_index]
        assert mine[0].prompt_token_ids == c.prompt_token_ids and all(not p.prompt_token_ids for p in mine[1:])
        for s in c.samples:
            parts = [x for p in mine for x in p.samples if x.index == s.index]
            assert [t for x in parts for t in x.token_ids] == s.token_ids
            assert [lp for x in parts for lp in x.logprobs] == pytest.approx(list(s.logprobs))
            assert [top for x in parts for top in x.top_logprobs] == s.top_logprobs
            assert [x.finish_reason for x in parts] == [None] * (len(parts) - 1) + ["length"]
            assert (parts[-1].weight_version, parts[-1].token_weight_versions) == (s.weight_version, s.token_weight_versions)


def test_only_the_stream_streams_tokens(bf16_server):
    from rollout_client.proto.rollout.v1 import rollout_pb2 as pb
    from rollout_client.proto.rollout.v1 import rollout_pb2_grpc as pb_grpc

    stub = pb_grpc.RolloutServiceStub(grpc.insecure_channel(bf16_server.grpc_address))
    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(pb.GenerateRequest(prompts=[pb.Prompt(token_ids=[5, 6])], stream_tokens=True))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "stream_tokens" in err.value.details()
    reply = httpx.post(f"{bf16_server.http_url}/v1/generate", json={"prompts": [{"token_ids": [5, 6]}], "stream_tokens": True})
    assert reply.status_code == 400 and "stream_tokens" in reply.text


async def test_async_client_generates_and_streams(bf16_server):
    from rollout_client import AsyncRolloutClient

    async with AsyncRolloutClient(bf16_server.grpc_address, timeout=60) as client:
        out = await client.generate(["hello"], n=2, max_tokens=4, temperature=1.0, seed=3)
        assert len(out[0].samples) == 2
        streamed = [c async for c in client.generate_stream(["a", "b"], max_tokens=4)]
        assert sorted(c.prompt_index for c in streamed) == [0, 1]
        assert (await client.status()).model


def test_status_reports_model_settings_and_counters(bf16_client):
    before = bf16_client.status()
    bf16_client.generate(["count me"], n=2, max_tokens=4, temperature=1.0, ignore_eos=True)
    st = bf16_client.status()
    assert st.dtype == "bfloat16" and st.quantization == "none" and st.logprobs_mode == "processed"
    assert st.vocab_size == 2048 and st.max_model_len == 256 and st.weight_version == 0
    assert st.engine_version
    assert st.counters.requests_total == before.counters.requests_total + 1
    assert st.counters.tokens_generated == before.counters.tokens_generated + 8
    assert st.counters.requests_running == 0 and st.counters.engine_requests_running == 0


def test_grpc_health_and_reflection_are_on(bf16_server):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(bf16_server.grpc_address) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="rollout.v1.RolloutService"))
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        reply = next(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
        names = {s.name for s in reply.list_services_response.service}
        assert "rollout.v1.RolloutService" in names


def test_http_generate_status_and_healthz_mirror_grpc(bf16_server, bf16_client):
    import httpx

    body = {"prompts": [{"text": "The trainer"}, {"token_ids": [5, 6, 7]}], "sampling": {"max_tokens": 6, "temperature": 0.0}}
    r = httpx.post(f"{bf16_server.http_url}/v1/generate", json=body, timeout=60)
    assert r.status_code == 200, r.text
    http_out = r.json()["completions"]
    grpc_out = bf16_client.generate(["The trainer"], [[5, 6, 7]], max_tokens=6, temperature=0.0)
    assert [c["samples"][0]["token_ids"] for c in http_out] == [c.samples[0].token_ids for c in grpc_out]
    assert http_out[0]["samples"][0]["finish_reason"] in ("stop", "length")
    assert httpx.get(f"{bf16_server.http_url}/healthz").json() == {"status": "SERVING"}
    assert httpx.get(f"{bf16_server.http_url}/v1/status").json()["vocab_size"] == 2048


def test_detokenize_false_returns_the_same_tokens_and_logprobs_without_text(bf16_client):
    kwargs = dict(max_tokens=8, temperature=0.0, ignore_eos=True)
    with_text = bf16_client.generate(prompt_token_ids=[[11, 12, 13]], **kwargs)[0].samples[0]
    ids_only = bf16_client.generate(prompt_token_ids=[[11, 12, 13]], detokenize=False, **kwargs)[0].samples[0]
    assert with_text.text and ids_only.text == ""
    assert ids_only.token_ids == with_text.token_ids and (ids_only.logprobs == with_text.logprobs).all()
