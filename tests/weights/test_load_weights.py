"""load_weights: a checkpoint the server reads from an S3 bucket (moto's real server) or a directory
it is allowed, through the push's own checks and commit: the engine then holds bitwise what a push
of the same tensors gives it, and a load that cannot be read whole commits nothing."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import boto3
import httpx
import pytest
import torch
from safetensors.torch import save, save_file

from rollout_client import (
    DataLossError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    RolloutClient,
)
from tests.weights.conftest import engine_weights, start_server, step

pytestmark = pytest.mark.engine

LOADER = "loader"  # the IAM user the server reads the bucket as: buckets named rollout-* only


@pytest.fixture(scope="module")
def loader_credentials(s3_server) -> dict[str, str]:
    """An IAM user that may read buckets named rollout-* and no other (moto enforces it once auth is on)."""
    iam = boto3.client("iam", endpoint_url=s3_server.endpoint)
    iam.create_user(UserName=LOADER)
    allowed = ["arn:aws:s3:::rollout-*", "arn:aws:s3:::rollout-*/*"]
    policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": allowed}]}
    iam.put_user_policy(UserName=LOADER, PolicyName="rollout-buckets", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName=LOADER)["AccessKey"]
    return {"AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}


@pytest.fixture(scope="module")
def load_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("checkpoints")


@pytest.fixture(scope="module")
def load_target(request, tiny_model, tmp_path_factory, s3_server, loader_credentials, load_root):
    """A bf16 server that reads S3 as the loader user and local checkpoints under load_root only."""
    with _environment(loader_credentials):
        # Every bucket (s3://): what the loader user may read is IAM's to decide, as the refusals show.
        return start_server(request, tiny_model, tmp_path_factory, "load-target", "--load-dirs", str(load_root), "--load-urls", "s3://")


@pytest.fixture(scope="module")
def client(load_target):
    with RolloutClient(load_target.grpc_address, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def bucket(s3_server):
    return s3_server.new_bucket()


@contextlib.contextmanager
def _environment(values: dict[str, str]):
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                del os.environ[k]
            else:
                os.environ[k] = v


@contextlib.contextmanager
def _s3_auth(s3_server):
    """moto checks credentials and IAM policies inside the block (by default it lets every call through)."""
    httpx.post(f"{s3_server.endpoint}/moto-api/reset-auth", content=b"0").raise_for_status()
    try:
        yield
    finally:
        httpx.post(f"{s3_server.endpoint}/moto-api/reset-auth", content=b"1000000000").raise_for_status()


def _sharded(weights: dict[str, torch.Tensor], shards: int = 2) -> dict[str, bytes]:
    """A Hugging Face sharded checkpoint of `weights`: file name -> bytes."""
    names = sorted(weights)
    files = {f"model-{i + 1:05d}-of-{shards:05d}.safetensors": names[i::shards] for i in range(shards)}
    out = {f: save({n: weights[n].contiguous() for n in ns}, metadata={"format": "pt"}) for f, ns in files.items()}
    out["model.safetensors.index.json"] = json.dumps({"metadata": {}, "weight_map": {n: f for f, ns in files.items() for n in ns}}).encode()
    return out


def _upload(s3_server, bucket: str, prefix: str, files: dict[str, bytes]) -> str:
    s3 = boto3.client("s3", endpoint_url=s3_server.endpoint)
    for name, data in files.items():
        s3.put_object(Bucket=bucket, Key=f"{prefix}/{name}", Body=data)
    return f"s3://{bucket}/{prefix}/"


def _pushed(client, server, weights) -> dict[str, torch.Tensor]:
    """The engine's weights after a streamed push of `weights`."""
    client.push_weights(weights, shared_memory=False, delta=False)
    return engine_weights(server)


def _differing(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    assert a.keys() == b.keys()
    return [k for k in a if not torch.equal(a[k], b[k])]


def test_a_sharded_load_from_s3_holds_bitwise_what_a_push_of_the_same_tensors_holds(
    client, load_target, s3_server, bucket, weights0, weights1
):
    """Half the tensors float32 in the bucket: the server casts them to bf16 as it casts pushed ones."""
    mixed = {k: (v.float() if i % 2 else v) for i, (k, v) in enumerate(sorted(weights1.items()))}
    url = _upload(s3_server, bucket, "step-1", _sharded(mixed))
    pushed = _pushed(client, load_target, mixed)
    client.push_weights(weights0, shared_memory=False, delta=False)
    before = client.status().committed_version
    result = client.load_weights(url, expected_version=before, label="step 1")
    assert (result.version, result.label, result.tensors_applied) == (before + 1, "step 1", len(mixed))
    assert _differing(engine_weights(load_target), pushed) == []


def test_a_load_from_an_allowed_directory_holds_bitwise_what_a_push_holds(client, load_target, load_root, weights0, weights1):
    w2 = step(weights1, seed=7)
    folder = load_root / "step-2"
    folder.mkdir()
    save_file(w2, folder / "model.safetensors", metadata={"format": "pt"})
    pushed = _pushed(client, load_target, w2)
    client.push_weights(weights0, shared_memory=False, delta=False)
    client.load_weights(str(folder))
    assert _differing(engine_weights(load_target), pushed) == []


def test_the_http_route_loads_a_single_file(client, load_target, load_root, weights1):
    path = load_root / "one.safetensors"
    save_file(weights1, path)
    version = client.status().committed_version
    reply = httpx.post(f"{load_target.http_url}/v1/weights:load", params={"url": str(path), "label": "http"}, timeout=300)
    assert reply.status_code == 200, reply.text
    assert reply.json()["version"] == version + 1 and reply.json()["label"] == "http"


def _refusals(s3_server, bucket, load_root, weights0) -> dict[str, tuple[str, type, str]]:
    """Loads that must fail: case -> (url, client error, what its message names)."""
    files = _sharded(weights0)
    good = _upload(s3_server, bucket, "good", files)
    shard = "model-00002-of-00002.safetensors"
    missing = _upload(s3_server, bucket, "missing", {k: v for k, v in files.items() if k != shard})
    truncated = _upload(s3_server, bucket, "truncated", {**files, shard: files[shard][:-100]})
    renamed = {("model.layers.0.mlp.gate_proj.wieght" if k == "model.layers.0.mlp.gate_proj.weight" else k): v for k, v in weights0.items()}
    wrong_name = _upload(s3_server, bucket, "wrong-name", {"model.safetensors": save(renamed)})
    wrong_dtype = _upload(s3_server, bucket, "wrong-dtype", {"model.safetensors": save({k: v.double() for k, v in weights0.items()})})
    private = s3_server.new_bucket("private")
    denied = _upload(s3_server, private, "step", files)
    outside = load_root.parent / "elsewhere"
    outside.mkdir(exist_ok=True)
    save_file(weights0, outside / "model.safetensors")
    escape = load_root / "escape"
    escape.symlink_to(outside)
    return {
        "missing object": (missing, NotFoundError, f"missing/{shard}"),
        "missing directory": (f"s3://{bucket}/nothing-here/", NotFoundError, "nothing-here"),
        "truncated shard": (truncated, DataLossError, f"truncated/{shard}"),
        "wrong name": (wrong_name, InvalidArgumentError, "wrong-name/model.safetensors: model.layers.0.mlp.gate_proj.wieght"),
        "wrong dtype": (wrong_dtype, InvalidArgumentError, "wrong-dtype/model.safetensors: "),
        "bucket without access": (denied, PermissionDeniedError, private),
        "directory outside load_dirs": (str(outside), PermissionDeniedError, "load_dirs"),
        "symlink out of load_dirs": (str(escape), PermissionDeniedError, "load_dirs"),
        "stale expected_version": (good, FailedPreconditionError, "expected_version"),
    }


def test_a_load_that_cannot_be_read_whole_is_refused_naming_it_and_commits_nothing(
    client, load_target, s3_server, bucket, load_root, weights0, weights1
):
    client.push_weights(weights1, shared_memory=False, delta=False)
    cases = _refusals(s3_server, bucket, load_root, weights0)
    before, weights = client.status().committed_version, engine_weights(load_target)
    with _s3_auth(s3_server):  # the loader user's policy now holds: rollout-* buckets only
        for case, (url, error, named) in cases.items():
            with pytest.raises(error) as caught:
                client.load_weights(url, expected_version=before - 1 if case.startswith("stale") else None)
            assert named in str(caught.value), case
            assert case != "wrong dtype" or "dtype 'F64'" in str(caught.value)
            assert client.status().committed_version == before, case
        assert _differing(engine_weights(load_target), weights) == []
        # The same checkpoint under the right expected_version loads.
        assert client.load_weights(cases["stale expected_version"][0], expected_version=before).version == before + 1
