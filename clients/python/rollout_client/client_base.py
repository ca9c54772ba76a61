"""What RolloutClient and AsyncRolloutClient share beyond their calls: the connection, and the
state a push decides its way from (delta or whole, streamed or through shared memory)."""

from __future__ import annotations

import itertools
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rollout_client import push, shared
from rollout_client.channel import ChannelOptions, RetryPolicy
from rollout_client.errors import DeltaBaseError
from rollout_client.proto.rollout.v1 import rollout_pb2 as pb
from rollout_client.proto.rollout.v1 import rollout_pb2_grpc as pb_grpc
from rollout_client.steps import RUNNER_FRAMES

# The request ids the server keeps (rollout_service/observe/calls.py): up to 128 of these characters.
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:/=+@-]{1,128}")


class ClientBase:
    """What both clients are built on: the channel (blocking or asyncio), its stub, call metadata,
    the default deadline, and what a push knows of the server (its delta codecs, its shared memory)
    and keeps of its own (the delta base).

    Args:
        address: "host:port".
        timeout: default deadline of every call, seconds (None: no deadline).
        retry: how idempotent calls retry on UNAVAILABLE (channel.NO_RETRY turns it off).
        tls, root_certificates, api_key, client_certificate, client_key: see channel.ChannelOptions.
    """

    _asyncio = False

    def __init__(
        self,
        address: str,
        timeout: float | None = 600.0,
        *,
        retry: RetryPolicy = RetryPolicy(),
        tls: bool = False,
        root_certificates: bytes | str | None = None,
        api_key: str | None = None,
        client_certificate: bytes | str | None = None,
        client_key: bytes | str | None = None,
    ):
        self.address = address
        self.timeout = timeout
        options = ChannelOptions(
            retry=retry, tls=tls, root_certificates=root_certificates, api_key=api_key,
            client_certificate=client_certificate, client_key=client_key,
        )
        self._options = options
        self._metadata = options.metadata()
        self._channel = options.aio_channel(address) if self._asyncio else options.channel(address)
        self._stub = pb_grpc.RolloutServiceStub(self._channel)
        # What delta pushes encode against (a bf16 copy of the tensors they pushed).
        self.delta_base = push.DeltaBase()
        self._delta_codecs: list[str] | None = None  # the server's, read with its status
        self._shared_memory: pb.SharedMemory | None = None  # the server's, read on the first push
        self._shared_seen = False  # this process saw that directory at the last push

    def _status_needed(self, delta: bool | None, shared_memory: bool | None) -> str:
        """Whether a push reads the server's status first: "required" (delta=True and its delta
        codecs are not known yet; shared memory is required), "optional" (to look for shared memory
        and, for the default delta choice, the codecs: where the status call fails, the push streams
        whole tensors), or "" (known: the first push read it, and the directory seen at the last
        push is still usable, or none was seen)."""
        if (delta and self._delta_codecs is None) or shared_memory:
            return "required"
        if delta is None and self._delta_codecs is None:
            return "optional"
        if shared_memory is False:
            return ""
        known = self._shared_memory
        return "optional" if known is None or (self._shared_seen and not shared.can_share_memory_with(known)) else ""

    def _push_setup(
        self, delta: bool | None, shared_memory: bool | None, status: pb.GetStatusResponse | None
    ) -> tuple[push.DeltaPlan | None, shared.SharedWriter | None]:
        """A push's delta plan and shared-memory writer (None: whole tensors; streamed)."""
        if status is not None:
            self._shared_memory = pb.SharedMemory()
            self._shared_memory.CopyFrom(status.shared_memory)
            if delta is not False:  # read again with each status: a restarted server may run another dtype
                self._delta_codecs = list(status.delta_codecs)
                if delta and not self._delta_codecs:
                    warnings.warn(
                        "this server takes no delta pushes (its engine does not run bfloat16): pushing whole tensors",
                        stacklevel=4 + RUNNER_FRAMES,
                    )
        plan = writer = None
        self._shared_seen = self._shared_memory is not None and shared.can_share_memory_with(self._shared_memory)
        if delta is None:
            # Deltas pay where bytes cross a link; through shared memory the wire is nearly free and
            # the encoding only adds work (BENCHMARKS.md: 0.79-0.86x a whole push on one host).
            delta = not (self._shared_seen and shared_memory is not False)
        if delta and self._delta_codecs:
            plan = push.DeltaPlan(self.delta_base, "zlib" if "zlib" in self._delta_codecs else self._delta_codecs[0])
        if shared_memory is not False:
            if self._shared_seen:
                writer = shared.SharedWriter(Path(self._shared_memory.dir))
            elif shared_memory:
                where = self._shared_memory.dir if self._shared_memory is not None and self._shared_memory.dir else None
                raise ValueError(
                    "shared_memory=True, but " + (
                        f"this process does not see the server's shared-memory directory {where} (another host or "
                        "/dev/shm, another user, or its server is gone)" if where else "the server takes no tensors in shared memory"
                    )
                )
        return plan, writer

    def _whole_after(
        self, refused: push.DeltaPlan, exc: DeltaBaseError, items: Iterator, options: dict, source: push.SourceErrors
    ) -> tuple[push.DeltaPlan, push.SourceErrors]:
        """The whole push that follows a refused delta push (whose request stream has stopped): the
        tensors it took, then the rest of the caller's, recorded as the new base."""
        warnings.warn(f"delta push refused ({exc.details}); pushing whole tensors instead", stacklevel=3 + RUNNER_FRAMES)
        source.close()
        self.delta_base.version = None  # the base matches no version the server holds: record anew
        plan = push.DeltaPlan(self.delta_base, refused.codec)
        writer = source.shared.for_next_push() if source.shared is not None else None
        stream = push.requests(itertools.chain(refused.resent(), items), plan=plan, shared=writer, **options)
        return plan, push.SourceErrors(stream, writer)

    def _deadline(self, timeout: float | None) -> float | None:
        return timeout if timeout is not None else self.timeout

    def _invoke(self, method: str, request: Any, timeout: float | None) -> Any:
        """Start the RPC `method` on this client's channel: its reply (blocking), an awaitable of
        it (asyncio), or the call to iterate (a stream)."""
        metadata = self._metadata
        request_id = getattr(request, "request_id", "")  # a Generate's: the server's request id for the call too
        if _REQUEST_ID.fullmatch(request_id):  # else the server makes one: what it keeps (observe/calls.py)
            metadata = (*metadata, ("x-request-id", request_id))
        return getattr(self._stub, method)(request, timeout=self._deadline(timeout), metadata=metadata)
