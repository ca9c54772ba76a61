"""A real server (`serve --backend local`, a vLLM engine) with API keys, mutual TLS and small limits:
every role over gRPC and HTTPS, refusals that change nothing, malformed bodies that are never a 5xx,
keys rotated by `make-key` while it runs, and a log that never holds a key."""

from __future__ import annotations

import json
import random
import struct
import subprocess
import sys

import httpx
import numpy as np
import pytest
from rollout_client import (
    NO_RETRY,
    InvalidArgumentError,
    PermissionDeniedError,
    ResourceExhaustedError,
    RolloutClient,
    UnauthenticatedError,
    UnavailableError,
)
from safetensors.torch import load_file, save

from rollout_service.api.access import digest
from rollout_service.launcher import ServerProcess
from tests.tls import Pki

pytestmark = pytest.mark.engine

TRAINER = "trainer-key-for-the-security-test-0001"
EVAL = "eval-key-for-the-security-test-00000002"
ADMIN = "admin-key-for-the-security-test-0000003"
PROMPT = [[3, 14, 15, 92, 65]]
GREEDY = dict(max_tokens=8, temperature=0.0)


class Secured:
    def __init__(self, server: ServerProcess, pki: Pki, keys_path):
        self.server, self.pki, self.keys_path = server, pki, keys_path
        self.https = server.http_url.replace("http://", "https://")

    def client(self, key: str | None, certificate: bool = True) -> RolloutClient:
        tls = {"client_certificate": self.pki.client_cert, "client_key": self.pki.client_key} if certificate else {}
        return RolloutClient(self.server.grpc_address, timeout=120, retry=NO_RETRY,
                             api_key=key, root_certificates=self.pki.ca, **tls)

    def http(self, key: str | None, certificate: bool = True) -> httpx.Client:
        headers = {"authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.https, headers=headers, verify=self.pki.client_context(certificate), timeout=120)

    def observed(self) -> tuple[int, list[int], list[float]]:
        """The version and the greedy output of one prompt alone in its call (a fixed batch schedule)."""
        with self.client(ADMIN) as c:
            sample = c.generate(prompt_token_ids=PROMPT, **GREEDY)[0].samples[0]
            return c.status().weight_version, sample.token_ids, sample.logprobs.tolist()


@pytest.fixture(scope="module")
def secured(tiny_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("secured")
    pki = Pki.make(folder / "pki")
    keys = folder / "api-keys"
    keys.write_text(f"# the test's keys\ntrainer:{TRAINER}\neval:sha256:{digest(EVAL)}\nadmin:{ADMIN}\n")
    server = ServerProcess.start(
        tiny_model, folder / "server.log", "--backend", "local", "--max-model-len", "256",
        "--api-keys", str(keys), "--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key),
        "--tls-client-ca", str(pki.ca), "--max-prompts-per-call", "4", "--max-tokens-per-sample", "64",
        "--max-prompt-tokens", "40",
        "--max-request-mib", "1", "--max-push-mib", "8",
    )
    yield Secured(server, pki, keys)
    server.stop()  # module-scoped: its engine's memory is free again for the modules after it


def test_every_role_over_grpc_on_the_real_server(secured, tiny_model):
    weights = load_file(tiny_model / "model.safetensors")
    with secured.client(TRAINER) as trainer:
        assert trainer.generate(prompt_token_ids=PROMPT, **GREEDY)[0].samples[0].weight_version == 0
        result = trainer.push_weights(weights, expected_version=0, label="trainer push")
        assert result.version == 1
    with secured.client(EVAL) as evaluator:
        assert evaluator.status().weight_version == 1
        assert evaluator.generate(prompt_token_ids=PROMPT, **GREEDY)[0].samples[0].weight_version == 1
        with pytest.raises(PermissionDeniedError, match="role 'eval' may not push"):
            evaluator.push_weights(weights)
    for key in (None, "an-unknown-key-0123456789"):
        with secured.client(key) as stranger:
            with pytest.raises(UnauthenticatedError):
                stranger.status()
            with pytest.raises(UnauthenticatedError):
                stranger.push_weights(weights)
    with secured.client(ADMIN) as admin:
        assert admin.push_weights(weights, expected_version=1).version == 2


def test_every_role_over_https_on_the_real_server(secured):
    for key, generate, metrics in ((TRAINER, 200, 200), (EVAL, 200, 200), (ADMIN, 200, 200), (None, 401, 401)):
        with secured.http(key) as http:
            assert http.post("/v1/generate", json={"prompts": [{"token_ids": PROMPT[0]}]}).status_code == generate
            assert http.get("/metrics").status_code == metrics
            assert http.get("/healthz").status_code == 200
    with secured.http(EVAL) as http:
        reply = http.post("/v1/weights", content=save({}))
        assert reply.status_code == 403 and reply.json()["error"]["code"] == "PERMISSION_DENIED"


def test_the_openai_endpoints_take_the_same_keys_roles_tls_and_limits(secured, tiny_model):
    import openai

    def oai(key: str) -> openai.OpenAI:
        http = httpx.Client(verify=secured.pki.client_context(True), timeout=120)
        return openai.OpenAI(base_url=f"{secured.https}/v1", api_key=key, max_retries=0, http_client=http)

    messages = [{"role": "user", "content": "hi"}]
    for key in (TRAINER, EVAL):
        with oai(key) as client:
            assert client.models.list().data[0].id == tiny_model.name
            assert len(client.chat.completions.create(model=tiny_model.name, messages=messages, max_tokens=3).choices) == 1
    with oai("an-unknown-key-0123456789") as stranger:
        with pytest.raises(openai.AuthenticationError) as err:
            stranger.completions.create(model=tiny_model.name, prompt="x")
        assert err.value.body["type"] == "authentication_error"  # OpenAI's error shape, before the app runs
    with oai(TRAINER) as client:
        with pytest.raises(openai.BadRequestError) as err:
            client.completions.create(model=tiny_model.name, prompt="x", max_tokens=65)
        assert err.value.body["param"] == "max_tokens" and "max_tokens_per_sample=64" in err.value.body["message"]
        with pytest.raises(openai.BadRequestError, match="max_prompts_per_call=4"):
            client.completions.create(model=tiny_model.name, prompt=["x"] * 5, max_tokens=2)


def test_mutual_tls_refuses_a_client_without_a_certificate_and_a_plaintext_one(secured):
    with secured.client(ADMIN, certificate=False) as bare, pytest.raises(UnavailableError):
        bare.status()
    with secured.http(ADMIN, certificate=False) as http, pytest.raises(httpx.HTTPError):
        http.get("/healthz")
    with RolloutClient(secured.server.grpc_address, timeout=20, retry=NO_RETRY, api_key=ADMIN) as plain:
        with pytest.raises(UnavailableError):
            plain.status()


def test_each_limit_over_it_is_a_clear_error_and_changes_nothing(secured):
    before = secured.observed()
    with secured.client(TRAINER) as c:
        with pytest.raises(InvalidArgumentError, match="prompts: 5 prompts exceed max_prompts_per_call=4"):
            c.generate(prompt_token_ids=PROMPT * 5, **GREEDY)
        with pytest.raises(InvalidArgumentError, match="sampling.max_tokens: 65 exceeds max_tokens_per_sample=64"):
            c.generate(prompt_token_ids=PROMPT, max_tokens=65)
        with pytest.raises(InvalidArgumentError, match=r"prompts\[0\].token_ids: 41 prompt tokens exceed max_prompt_tokens=40"):
            c.generate(prompt_token_ids=[[1] * 41])
        with pytest.raises(ResourceExhaustedError, match="max_push_mib"):
            c.push_weights({"model.embed_tokens.weight": np.zeros(9 * 2**20 // 4, np.float32)})
    with secured.http(TRAINER) as http:
        reply = http.post("/v1/generate", json={"prompts": [{"token_ids": [1]}], "request_id": "x" * 2**20})
        assert reply.status_code == 413 and reply.json()["error"]["code"] == "RESOURCE_EXHAUSTED"
    assert secured.observed() == before


def _malformed_bodies(rng: random.Random, good: bytes):
    size = struct.unpack("<Q", good[:8])[0]
    header = good[8 : 8 + size]
    for i in range(400):
        kind = i % 4
        if kind == 0:  # random bytes
            yield "/v1/weights", bytes(rng.randrange(256) for _ in range(rng.randint(0, 300)))
        elif kind == 1:  # a real header, mutated
            mutated = bytearray(header)
            for _ in range(rng.randint(1, 6)):
                at = rng.randrange(len(mutated))
                mutated[at : at + rng.randint(0, 4)] = bytes([rng.randrange(256)]) * rng.randint(0, 3)
            yield "/v1/weights", struct.pack("<Q", len(mutated)) + bytes(mutated) + good[8 + size :]
        elif kind == 2:  # an announced header size that lies
            yield "/v1/weights", struct.pack("<Q", rng.choice([0, 1, size + 50, 2**40, 2**64 - 1])) + header
        else:  # generate requests of the wrong shape
            body = rng.choice([
                b"{", b"[]", b"null", b'{"prompts": 5}', b'{"prompts": [{"token_ids": [-1]}]}',
                b'{"prompts": [{"text": "a"}], "sampling": {"n": 0}}', b'{"prompts": [{"token_ids": [1]}], "x": 1}',
                json.dumps({"prompts": [{"token_ids": [rng.randrange(-5, 10**9)]}]}).encode(),
                bytes(rng.randrange(256) for _ in range(64)),
            ])
            yield "/v1/generate", body


@pytest.mark.reliability("fuzz")
def test_malformed_http_bodies_are_client_errors_never_5xx_and_change_nothing(secured, tiny_model, record_property):
    """400 malformed bodies (random bytes, mutated and lying safetensors headers, generate requests
    of the wrong shape) against a server with keys, mutual TLS and limits: all 4xx, nothing changed."""
    before = secured.observed()
    good = save({"model.norm.weight": load_file(tiny_model / "model.safetensors")["model.norm.weight"]})
    statuses: dict[int, int] = {}
    with secured.http(TRAINER) as http:
        for path, body in _malformed_bodies(random.Random(0), good):
            status = http.post(path, content=body, headers={"content-type": "application/json"}).status_code
            statuses[status] = statuses.get(status, 0) + 1
    print(f"\n400 malformed bodies: {dict(sorted(statuses.items()))}")
    for status, n in sorted(statuses.items()):
        record_property(f"cases: {status}", n)
    assert sum(statuses.values()) == 400
    assert all(400 <= s < 500 for s in statuses), statuses
    assert secured.observed() == before


CLIENT_CODES = {"INVALID_ARGUMENT", "DATA_LOSS", "FAILED_PRECONDITION", "CANCELLED", "RESOURCE_EXHAUSTED"}
DEFECTS = ("unknown name", "wrong shape", "bad dtype", "nbytes off", "bad crc", "bytes missing", "bytes beyond",
           "gap", "undeclared index", "duplicate", "stale version", "no commit", "chunk first", "nan", "bad policy")


def _defective_push(rng: random.Random, weights: dict, version: int, defect: str) -> list:
    """The messages of a push of 1-3 real tensors (zeros, bf16) with exactly one `defect`."""
    import zlib

    from rollout_client.proto.rollout.v1 import rollout_pb2 as pb

    names = rng.sample(sorted(weights), rng.randint(1, 3))
    specs, datas = [], []
    for name in names:
        shape = list(weights[name].shape)
        data = bytearray(2 * int(np.prod(shape)))
        if defect == "nan" and not datas:
            data[0:2] = b"\xc0\x7f"
        specs.append(pb.TensorSpec(name=name, dtype="bfloat16", shape=shape, nbytes=len(data), crc32=zlib.crc32(data)))
        datas.append(bytes(data))
    first = specs[0]
    if defect == "unknown name":
        first.name = rng.choice(["model.x.weight", "", "model.layers.99.mlp.up_proj.weight", "lm_head.bias"])
    elif defect == "wrong shape":
        first.shape[rng.randrange(len(first.shape))] += rng.choice([1, 7])
        first.nbytes = 2 * int(np.prod(first.shape))
    elif defect == "bad dtype":
        first.dtype = rng.choice(["float64", "int8", "", "bf16", "uint8"])
    elif defect == "nbytes off":
        first.nbytes += rng.choice([-2, -1, 1, 2, 1000])
    elif defect == "bad crc":
        first.crc32 = (first.crc32 + rng.randint(1, 2**31)) % 2**32
    elif defect == "duplicate":
        specs.append(pb.TensorSpec(name=first.name, dtype="bfloat16", shape=list(first.shape), nbytes=first.nbytes))
        datas.append(datas[0])
    header = pb.PushHeader(tensors=specs, label="fuzz", inflight="later" if defect == "bad policy" else "")
    if defect == "stale version":
        header.expected_version = version + rng.randint(1, 5)
    chunks = []
    for index, data in enumerate(datas):
        if defect == "bytes missing" and index == 0:
            data = data[: len(data) // 2]
        if defect == "bytes beyond" and index == 0:
            data = data + b"xx"
        step = max(1, len(data) // (2 if defect == "gap" and index == 0 else rng.randint(1, 4)))
        for offset in range(0, len(data), step):
            at = offset + (8 if defect == "gap" and index == 0 and offset else 0)
            chunks.append(pb.PushWeightsRequest(chunk=pb.PushChunk(tensor_index=index, offset=at, data=data[offset : offset + step])))
    if defect == "undeclared index":
        chunks.append(pb.PushWeightsRequest(chunk=pb.PushChunk(tensor_index=len(specs) + 3, offset=0, data=b"ab")))
    messages = [pb.PushWeightsRequest(header=header), *chunks]
    if defect == "chunk first":
        messages = chunks[:1] + messages
    if defect != "no commit":
        messages.append(pb.PushWeightsRequest(commit=pb.PushCommit()))
    return messages


@pytest.mark.reliability("fuzz")
def test_defective_grpc_pushes_are_client_errors_and_change_nothing(secured, tiny_model, record_property):
    """150 pushes of real tensors, each with one of 15 defects (unknown name, wrong shape or dtype,
    bad CRC, missing or extra bytes, gaps, duplicates, stale version, no commit, NaN, ...): each is
    a client error, and the version and outputs are unchanged."""
    import grpc
    from rollout_client.proto.rollout.v1 import rollout_pb2_grpc as pb_grpc

    weights = load_file(tiny_model / "model.safetensors")
    weights = {n: t for n, t in weights.items() if t.numel() <= 1 << 16}  # small tensors: many pushes
    before = secured.observed()
    pki = secured.pki
    credentials = grpc.ssl_channel_credentials(pki.ca.read_bytes(), pki.client_key.read_bytes(), pki.client_cert.read_bytes())
    rng = random.Random(1)
    codes: dict[str, int] = {}
    with grpc.secure_channel(secured.server.grpc_address, credentials) as channel:
        stub = pb_grpc.RolloutServiceStub(channel)
        for i in range(150):
            defect = DEFECTS[i % len(DEFECTS)]
            with pytest.raises(grpc.RpcError) as info:
                stub.PushWeights(iter(_defective_push(rng, weights, before[0], defect)), timeout=60,
                                 metadata=(("authorization", f"Bearer {TRAINER}"),))
            code = info.value.code().name
            assert code in CLIENT_CODES, (defect, code, info.value.details())
            codes[code] = codes.get(code, 0) + 1
    print(f"\n150 defective pushes: {dict(sorted(codes.items()))}")
    for code, n in sorted(codes.items()):
        record_property(f"cases: {code}", n)
    assert secured.observed() == before


def test_keys_made_by_make_key_work_at_once_and_a_deleted_line_revokes(secured):
    made = subprocess.run(
        [sys.executable, "-m", "rollout_service.cli", "make-key", "eval", "--append", str(secured.keys_path)],
        capture_output=True, text=True, check=True,
    )
    key = made.stdout.strip()
    assert key and key not in secured.keys_path.read_text()  # only its digest is kept
    with secured.client(key) as c:
        assert c.status().weight_version >= 0
    lines = secured.keys_path.read_text().splitlines()
    secured.keys_path.write_text("\n".join(line for line in lines if not line.startswith("eval:")) + "\n")
    with secured.client(key) as c, pytest.raises(UnauthenticatedError):
        c.status()
    with secured.client(EVAL) as c, pytest.raises(UnauthenticatedError):
        c.status()


def test_the_status_command_reaches_a_secured_server_with_key_and_certificates(secured):
    pki = secured.pki
    base = [sys.executable, "-m", "rollout_service.cli", "status", "-a", secured.server.grpc_address, "--json",
            "--interval", "0.1", "--root-certificates", str(pki.ca)]
    certs = ["--client-certificate", str(pki.client_cert), "--client-key", str(pki.client_key)]
    out = subprocess.run([*base, *certs, "--api-key", ADMIN], capture_output=True, text=True, timeout=60, check=True)
    data = json.loads(out.stdout)
    assert data["replica_versions"] == {"local": data.get("weight_version", "0")}
    refused = subprocess.run([*base, *certs], capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1 and "UNAUTHENTICATED" in refused.stderr


def test_the_server_log_never_holds_a_key(secured):
    log = secured.server.log_path.read_text()
    assert "API keys required" in log
    for key in (TRAINER, EVAL, ADMIN):
        assert key not in log
