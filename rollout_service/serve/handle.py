"""The replica set of a Ray Serve deployment (serve/replicas.py's interface over a
DeploymentHandle). Exceptions coming back through Serve are wrapped in RayTaskError (message: a
remote traceback); callers get the replica's own exception, to map it in errors.py and show its
message."""

from __future__ import annotations

import mmap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy
import ray

from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle

from rollout_service.errors import EngineUnavailable
from rollout_service.types import Completion


def unwrap(exc: BaseException) -> BaseException:
    while isinstance(exc, RayTaskError) and isinstance(exc.cause, BaseException):
        exc = exc.cause
    if isinstance(exc, RayActorError):  # the replica's process died during the call (killed, OOM)
        return EngineUnavailable(
            f"an engine replica died during the call ({type(exc).__name__}); Serve replaces it: retry the call"
        )
    if isinstance(exc, grpc.aio.AioRpcError):  # Serve's inter-deployment stream itself failed
        return EngineUnavailable(f"the stream from an engine replica failed: {exc.code().name}: {exc.details()}")
    return exc


@dataclass(frozen=True)
class SharedPart:
    """A push's part as the replicas of a Ray Serve deployment take it (serve/app.py): the file,
    hard-linked by a replica on the ingress's node (`node`), and for the replicas of other nodes one
    Ray object of its bytes (None while every replica runs on the ingress's node)."""

    path: Path
    node: str
    data: ray.ObjectRef | None


class ServeReplicas:
    def __init__(self, handle: DeploymentHandle):
        self.handle = handle
        self._node = ray.get_runtime_context().get_node_id()
        self._elsewhere = True  # until `locate` has looked: a part goes as a Ray object too
        # A call streams over Serve's inter-deployment gRPC (a stream per call, its items as
        # messages), not as a Ray object per item: a streamed token costs the ingress and the
        # replica half the CPU (BENCHMARKS.md, issue 32); Ray's token authentication guards it too.
        # Its message limit is raised for large batches and completions (serve/app.py SERVE_ENV).
        self._stream = handle.options(stream=True, _by_reference=False)

    async def broadcast(self, method: str, *args: Any) -> list:
        try:
            results = await self.handle.broadcast(method, *args).results_async(return_exceptions=True)
        except DeploymentUnavailableError:
            return []
        return [unwrap(r) if isinstance(r, BaseException) else r for r in results]

    def generate(self, *args: Any) -> _Stream:
        return _Stream(self._stream.generate_stream.remote(*args))

    async def call_one(self, method: str, *args: Any) -> Any:
        try:
            return await getattr(self.handle, method).remote(*args)
        except Exception as exc:
            raise unwrap(exc) from None

    async def locate(self) -> None:
        nodes = await self.broadcast("node")
        self._elsewhere = any(isinstance(n, BaseException) or n != self._node for n in nodes)

    def share(self, part: Path) -> SharedPart:
        """The file, and where a replica runs on another node one Ray object of it: a numpy array
        is put out of band (one copy into the object store, where bytes would be pickled twice)
        and read zero-copy by the replicas of each node; Ray moves it to other nodes (FACTS.md:
        0.42 vs 0.18 GB/s for bytes). A replica on this node links the file instead: no copy at
        all (a put and a write per replica cost a 587 MB push a quarter more, BENCHMARKS.md)."""
        if not self._elsewhere:
            return SharedPart(part, self._node, None)
        with open(part, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            view = numpy.frombuffer(mapped, numpy.uint8)
            try:
                return SharedPart(part, self._node, ray.put(view))
            finally:
                del view  # before the map closes


class _Stream:
    """A DeploymentResponseGenerator as a ReplicaStream: the replica's own errors, aclose() cancels."""

    def __init__(self, response):
        self._response = response

    def __aiter__(self):
        return self

    async def __anext__(self) -> Completion:
        try:
            return await self._response.__anext__()
        except StopAsyncIteration:
            raise
        except Exception as exc:
            raise unwrap(exc) from None

    async def aclose(self) -> None:
        self._response.cancel()  # no-op when finished; aborts the replica's requests otherwise
