"""`rollout-service mcp` as a coding agent runs it: a child process on stdio, driven by the MCP SDK's
own client, against real servers. Each tool's result is checked against the same call made with
RolloutClient; failures (no server, a key the server does not know, a role that may not roll back,
a version that is not kept) come back as tool errors with the server's message, and the bridge
answers the next call."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from mcp import ClientSession, StdioServerParameters, stdio_client
from rollout_client import NO_RETRY, RolloutClient
from safetensors.torch import load_file

from rollout_service.launcher import ServerProcess
from tests.tls import Pki
from tests.weights.conftest import perturb

pytestmark = pytest.mark.engine

TRAINER = "trainer-key-for-the-mcp-bridge-test-01"
EVAL = "eval-key-for-the-mcp-bridge-test-000002"
ADMIN = "admin-key-for-the-mcp-bridge-test-00003"
TOOLS = {"status", "versions", "rollback", "generate", "report"}
PROMPTS = ["The trainer computes the advantage", "A weight push streams"]


@asynccontextmanager
async def bridge(address: str, *args: str, key: str | None = None) -> AsyncIterator[ClientSession]:
    """`rollout-service mcp --address ADDRESS ARGS` with `key` in ROLLOUT_API_KEY (and no other key)."""
    env = {k: v for k, v in os.environ.items() if k != "ROLLOUT_API_KEY"} | ({"ROLLOUT_API_KEY": key} if key else {})
    params = StdioServerParameters(
        command=sys.executable, args=["-m", "rollout_service.cli", "mcp", "--address", address, *args], env=env
    )
    async with stdio_client(params) as (read, write), ClientSession(read, write) as session:
        await session.initialize()
        yield session


async def call(session: ClientSession, tool: str, **arguments) -> dict:
    result = await session.call_tool(tool, arguments)
    assert not result.is_error, result.content[0].text
    body = json.loads(result.content[0].text)
    assert body == result.structured_content  # the text an agent reads is the structured result
    return body


async def refused(session: ClientSession, tool: str, **arguments) -> str:
    result = await session.call_tool(tool, arguments)
    assert result.is_error and result.structured_content is None
    return result.content[0].text


GREEDY = {"max_tokens": 8, "temperature": 0.0, "ignore_eos": True}


class Keyed:
    """A server with API keys (trainer and eval) and TLS, to which this module pushes two versions
    (`first`, `second`: different weights, so different greedy outputs `before`, `changed`)."""

    def __init__(self, server: ServerProcess, pki: Pki):
        self.server, self.pki = server, pki
        self.address = server.grpc_address
        self.tls = ("--root-certificates", str(pki.ca))

    def client(self, key: str) -> RolloutClient:
        return RolloutClient(self.address, timeout=120, retry=NO_RETRY, api_key=key, root_certificates=self.pki.ca)

    def greedy(self) -> list[list[int]]:
        with self.client(TRAINER) as client:
            return [c.samples[0].token_ids for c in client.generate(PROMPTS, **GREEDY)]

    def push_two_versions(self, base: dict) -> None:
        with self.client(TRAINER) as trainer:
            self.first = trainer.push_weights(base, label="first").version
            self.before = self.greedy()
            self.second = trainer.push_weights(perturb(base, seed=1, scale=0.05), label="second").version
            self.changed = self.greedy()


@pytest.fixture(scope="module")
def keyed(tiny_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("mcp-keyed")
    pki = Pki.make(folder / "pki")
    keys = folder / "api-keys"
    keys.write_text(f"trainer:{TRAINER}\neval:{EVAL}\nadmin:{ADMIN}\n")
    server = ServerProcess.start(
        tiny_model, folder / "server.log", "--backend", "local", "--max-model-len", "256", "--no-http",
        "--api-keys", str(keys), "--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key),
    )
    keyed = Keyed(server, pki)
    keyed.push_two_versions(load_file(tiny_model / "model.safetensors"))
    yield keyed
    server.stop()  # module-scoped: its engine's memory is free again for the modules after it


async def test_the_five_tools_have_typed_schemas_and_no_server_is_a_tool_error():
    async with bridge("127.0.0.1:1") as session:  # nothing listens there
        tools = {t.name: t for t in (await session.list_tools()).tools}
        assert set(tools) == TOOLS and all(t.description for t in tools.values())
        generate = tools["generate"].input_schema
        assert generate["required"] == ["prompts"] and generate["properties"]["prompts"]["items"] == {"type": "string"}
        assert generate["properties"]["max_tokens"]["maximum"] == 128
        assert tools["rollback"].input_schema["properties"]["to_version"]["type"] == "integer"
        assert "required" not in tools["report"].input_schema  # no address: the key goes only where the bridge was told
        assert "--bf16-address" in await refused(session, "report")
        assert tools["status"].annotations.read_only_hint and tools["rollback"].annotations.destructive_hint
        assert "127.0.0.1:1: UNAVAILABLE" in await refused(session, "status")
        assert "127.0.0.1:1: UNAVAILABLE" in await refused(session, "versions")
        assert "max_tokens" in await refused(session, "generate", prompts=PROMPTS, max_tokens=10_000)  # over the cap
        assert len((await session.list_tools()).tools) == 5  # still serving


async def test_status_and_versions_are_the_servers_own_for_the_callers_key(keyed):
    async with bridge(keyed.address, *keyed.tls, key="a-key-the-server-does-not-know-0000") as session:
        assert "UNAUTHENTICATED" in await refused(session, "status")
    with keyed.client(EVAL) as client:
        direct, kept = client.status(), client.list_versions()
    async with bridge(keyed.address, *keyed.tls, "--api-key", EVAL) as session:  # eval: may read, may not push
        status = await call(session, "status")
        versions = (await call(session, "versions"))["versions"]
    assert status["address"] == keyed.address and status["model"] == direct.model
    for field in ("quantization", "weight_version", "committed_version", "replicas", "max_model_len"):
        assert status[field] == getattr(direct, field), field
    assert status["weight_version"] == keyed.second and status["replica_versions"] == dict(direct.replica_versions)
    assert status["last_push"]["version"] == keyed.second and status["last_push"]["label"] == "second"
    assert status["last_push"]["bytes_received"] == direct.last_push.bytes_received > 0
    assert status["counters"]["requests_total"] >= direct.counters.requests_total and "shared_memory" not in status
    assert [(v["version"], v["label"], v["tensors"], v["bytes"], v["committed_at"]) for v in versions] == [
        (v.version, v.label, v.tensors, v.bytes, v.committed_at) for v in kept
    ]
    assert [v["label"] for v in versions[:2]] == ["second", "first"]
    assert all(v["committed"].endswith("+00:00") for v in versions)


async def test_generate_probes_the_served_weights(bf16_server):
    with RolloutClient(bf16_server.grpc_address, timeout=60) as client:
        async with bridge(bf16_server.grpc_address) as session:
            probe = (await call(session, "generate", prompts=PROMPTS, max_tokens=8))["completions"]
        served = client.status().weight_version
        # Both prompts in one call, as the bridge sends them: the same batch, so the same greedy tokens.
        direct = client.generate(PROMPTS, max_tokens=8, temperature=0.0)
    assert [p["prompt"] for p in probe] == PROMPTS
    for got, c in zip(probe, direct):
        s = c.samples[0]
        assert (got["text"], got["tokens"], got["prompt_tokens"]) == (s.text, len(s.token_ids), len(c.prompt_token_ids))
        assert got["weight_version"] == s.weight_version == served
        assert got["mean_logprob"] == pytest.approx(float(s.logprobs.mean()), abs=1e-3) and got["mean_logprob"] < 0
        assert got["finish_reason"] in ("stop", "length") and 0 < got["tokens"] <= 8


async def test_report_between_the_bf16_and_int8_servers(bf16_server, int8_server):
    prompts = [*PROMPTS, "Every replica reports the version it serves"]
    async with bridge(int8_server.grpc_address, "--bf16-address", bf16_server.grpc_address) as session:
        report = await call(session, "report", prompts=prompts, n=2, max_tokens=8)
    f = report["figures"]
    assert report["bf16"]["quantization"] == "none" and report["quantized"] == {
        "address": int8_server.grpc_address, "quantization": "int8", "weight_version": report["quantized"]["weight_version"]
    }
    assert f["prompts"] == 3 and f["samples"] == 6 and f["tokens"] > 0
    assert 0 <= f["p50_abs_dlogprob"] <= f["p90_abs_dlogprob"] <= f["p99_abs_dlogprob"] <= f["max_abs_dlogprob"]
    assert f["kl"] >= 0 and 0 < f["tis_min"] <= f["tis_mean"] <= f["tis_cap"] == 2.0
    assert f["tokens_per_s_bf16"] > 0 and f["tokens_per_s_quant"] > 0
    # Greedy agreement, recomputed from the two servers' own greedy decodes.
    with RolloutClient(bf16_server.grpc_address) as bf16, RolloutClient(int8_server.grpc_address) as int8:
        same = [a.samples[0].token_ids == b.samples[0].token_ids
                for a, b in zip(bf16.generate(prompts, **GREEDY), int8.generate(prompts, **GREEDY))]
    assert f["greedy_identical"] == pytest.approx(sum(same) / len(same))


async def test_rollback_serves_a_kept_version_again_and_needs_the_role(keyed):
    """Rollback is an admin's call: the bridge passes the caller's key, so eval and trainer keys get
    the server's PERMISSION_DENIED, and an admin key rolls back."""
    first, second = keyed.first, keyed.second
    assert keyed.changed != keyed.before  # otherwise the rollback below would show nothing
    for key in (EVAL, TRAINER):
        async with bridge(keyed.address, *keyed.tls, key=key) as session:
            assert "PERMISSION_DENIED" in await refused(session, "rollback", to_version=first)
    async with bridge(keyed.address, *keyed.tls, key=ADMIN) as session:
        assert await refused(session, "rollback", to_version=second + 1000)  # not a kept version
        assert (await call(session, "status"))["weight_version"] == second  # neither refusal changed anything
        assert await call(session, "rollback", to_version=first, expected_version=second) == {
            "version": second + 1, "rolled_back_to": first
        }
        status = await call(session, "status")
        assert status["weight_version"] == status["committed_version"] == second + 1
        assert (await call(session, "versions"))["versions"][0]["version"] == second + 1
    assert keyed.greedy() == keyed.before


def test_bad_tls_files_stop_the_bridge_before_it_serves(tmp_path: Path):
    import subprocess

    done = subprocess.run(
        [sys.executable, "-m", "rollout_service.cli", "mcp", "--client-certificate", str(tmp_path / "none.pem")],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL, check=False,
    )
    assert done.returncode == 2 and "client_certificate and client_key go together" in done.stderr
