"""The single-process server (`--backend local`): one engine replica in this process, behind the
same ingress, push protocol and weight store as a Ray Serve deployment (serve/), with the replica
set of one (serve/replicas.py `InProcess`) in place of Serve's handle. No Ray and no Redis.

Given --weights-dir it loads the store's current version at start, so a restart resumes where it
stopped (without, the store is temporary). `run()` blocks until SIGINT/SIGTERM, then stops
gracefully: health goes NOT_SERVING, in-flight calls get a grace period, the engine shuts down.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import tempfile
from pathlib import Path

from rollout_service.api.access import Access
from rollout_service.config import ServerConfig
from rollout_service.engine.engine import with_context
from rollout_service.launcher import READY_PREFIX
from rollout_service.observe import tracing
from rollout_service.serve.coordinator import EmbeddedCoordinator
from rollout_service.serve.ingress import Ingress, check_ports_free
from rollout_service.serve.replica import EngineReplica
from rollout_service.serve.replicas import InProcess
from rollout_service.weights.versions import VersionStore, open_store

log = logging.getLogger("rollout_service")

REPLICA_ID = "local"


def local_store(config: ServerConfig) -> VersionStore:
    """The single-process server's weight store, held alone while it runs: `weights_dir` (kept,
    resumed from at start), or without it a temporary one under the staging directory, deleted at
    stop, so a new run starts from the checkpoint and never on an earlier run's pushes."""
    if config.weights_dir is not None:
        return open_store(config, shared=False)
    config.staging_root.mkdir(parents=True, exist_ok=True)
    store = VersionStore(Path(tempfile.mkdtemp(prefix="store-", dir=config.staging_root)), config.keep_versions, temporary=True)
    store.lock()
    log.info("pushed versions are not kept across restarts: give --weights-dir to resume on them after one")
    return store


async def serve(config: ServerConfig) -> None:
    """Start everything, log one ready line, run until a stop signal."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    check_ports_free(config)
    tracing.setup(config)
    config = with_context(config)
    access = Access.from_config(config)  # a bad keys file fails here, before the engine starts
    store = local_store(config)  # a second server on a --weights-dir fails here, before the engine starts
    replica = ingress = None
    try:
        store.clean()
        log.info("starting the engine on %s (dtype=%s, quantization=%s)", config.model, config.dtype, config.quantization)
        replica = await EngineReplica.start(config, REPLICA_ID, store)
        # No Redis even where one is configured (a Serve deployment's): this server's pushes are its own.
        ingress = await Ingress.start(
            config, InProcess(replica), store, access,
            coordinator=EmbeddedCoordinator(), requantize_into=config.staging_root, store_cleaned=True,
        )
        ends = ingress.endpoints()
        log.info(
            "%s grpc=%s http=%s model=%s dtype=%s quantization=%s logprobs=%s inflight=%s weight_version=%d weights_dir=%s",
            READY_PREFIX, ends["grpc"], ends["http"] or "off", config.model, config.dtype,
            config.quantization, config.logprobs_mode, config.inflight, replica.engine.weight_version, store.root,
        )
        await stop.wait()
        log.info("stopping: finishing in-flight calls")
    finally:
        if ingress is not None:
            await ingress.close()
        if replica is not None:
            replica.close()
        store.close()
        log.info("stopped")


def run(config: ServerConfig) -> None:
    asyncio.run(serve(config))
