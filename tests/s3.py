"""A real S3 server on loopback for the tests: moto's standalone server (the one s3fs's own test
suite runs against), on a free port, with its own credentials in the environment as the AWS SDK
reads them. Tests never mock S3."""

from __future__ import annotations

import os
import socket
import uuid
from dataclasses import dataclass

# Credentials moto accepts; set before any S3 client is made, as a deployment sets its own.
ENV = {
    "AWS_ACCESS_KEY_ID": "rollout-test-key",
    "AWS_SECRET_ACCESS_KEY": "rollout-test-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@dataclass
class S3Server:
    endpoint: str  # http://127.0.0.1:PORT
    server: object

    def env(self) -> dict[str, str]:
        """What a process needs to reach this server: credentials and the endpoint (AWS_ENDPOINT_URL,
        which botocore and s3fs read)."""
        return {**ENV, "AWS_ENDPOINT_URL": self.endpoint, "AWS_ENDPOINT_URL_S3": self.endpoint}

    def new_bucket(self, prefix: str = "rollout") -> str:
        """A fresh bucket; returns its name."""
        import boto3

        name = f"{prefix}-{uuid.uuid4().hex[:10]}"
        boto3.client("s3", endpoint_url=self.endpoint, **_boto_credentials()).create_bucket(Bucket=name)
        return name

    def stop(self) -> None:
        self.server.stop()


def _boto_credentials() -> dict[str, str]:
    return {
        "aws_access_key_id": ENV["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": ENV["AWS_SECRET_ACCESS_KEY"],
        "region_name": ENV["AWS_DEFAULT_REGION"],
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_s3() -> S3Server:
    """moto's server on a free loopback port, its credentials and endpoint set in os.environ (so
    this process's clients and the servers it starts reach it)."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    s3 = S3Server(f"http://127.0.0.1:{port}", server)
    os.environ.update(s3.env())
    return s3
