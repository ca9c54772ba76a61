"""Errors from a replica's Generate stream over Serve's inter-deployment gRPC reach the client as
the service's own (no Ray or gRPC internals), and the stream's message limit is raised in every
deployment's environment (Ray's default 4 MiB is less than a long sample's completion)."""

from __future__ import annotations

import grpc

from rollout_service.config import ServerConfig
from rollout_service.errors import EngineUnavailable
from rollout_service.serve import app, handle


def test_a_failed_inter_deployment_stream_is_engine_unavailable_naming_its_code():
    failed = grpc.aio.AioRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, None, None, details="message larger than max")
    err = handle.unwrap(failed)
    assert isinstance(err, EngineUnavailable) and "RESOURCE_EXHAUSTED: message larger than max" in str(err)


def test_every_deployment_gets_the_raised_message_limit(tiny_model):
    config = app.app_config(ServerConfig(model=tiny_model, replica_cpus=1))
    assert int(config["runtime_env"]["env_vars"]["RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH"]) > 1 << 30
