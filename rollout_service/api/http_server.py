"""The HTTP server (uvicorn) that both assemblies run the FastAPI app on, hardened against strangers
who connect and then say nothing.

uvicorn 0.55 arms no timer until a connection's first response, and cancels its keep-alive timer
on any byte received, so a connection that sends nothing, or a request head one byte at a time,
stays open forever. `GuardedHttpProtocol` closes a connection whose request head is not complete
within FIRST_REQUEST_S of its opening (or of its last response), and refuses a peer's connections
beyond CONNECTIONS_PER_PEER; the process's open-file limit is raised to its hard limit so that
thousands of idle sockets do not use up the descriptors /healthz and a trainer's call need.
A connection is closed as nginx's `lingering_close` does (`LingeringClose`), so that a client still
sending a body the server has refused reads the refusal instead of a reset.
(Requests handled at once are counted by the app's middleware, api/http_app.py: uvicorn's
limit_concurrency counts idle connections too, and would let them turn every request away.)
"""

from __future__ import annotations

import asyncio
import collections
import logging
import resource
import ssl

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from rollout_service.config import ServerConfig

log = logging.getLogger(__name__)

# Seconds a connection may take to send a complete request head (nginx's client_header_timeout
# is 60 s, Apache's RequestReadTimeout header=20-40 s).
FIRST_REQUEST_S = 20.0
# Open connections one peer address may have: an agent framework's pool of hundreds, or a few
# trainers behind one NAT, fit; one stranger cannot hold the server's open files.
CONNECTIONS_PER_PEER = 4096
# Seconds a closing connection keeps reading (and dropping) what its client still sends.
LINGER_S = 2.0


class LingeringClose:
    """A connection's transport whose `close()` first sends FIN after the response and reads on
    for LINGER_S before closing. A socket closed with unread bytes in its receive buffer (a body
    refused before it was read: 413, a trickle cut off with 504) sends RST instead of FIN, and the
    client's kernel may then drop the response it had not read yet. TLS transports cannot
    half-close: they close at once."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop):
        self._transport, self._loop = transport, loop
        self.lingering = False

    def close(self) -> None:
        transport = self._transport
        if self.lingering or transport.is_closing():
            return
        if not transport.can_write_eof():
            transport.close()
            return
        self.lingering = True
        transport.write_eof()  # FIN once the response is written
        transport.resume_reading()  # flow control may have paused it mid-body
        self._loop.call_later(LINGER_S, transport.close)  # or sooner: the client's FIN closes it

    def is_closing(self) -> bool:
        return self.lingering or self._transport.is_closing()

    def __getattr__(self, name: str):
        return getattr(self._transport, name)


class GuardedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, closing a connection whose request head takes longer than
    FIRST_REQUEST_S to arrive (counted from the connection, or from the last response)."""

    head_timeout_s = FIRST_REQUEST_S
    per_peer = CONNECTIONS_PER_PEER
    _peers: collections.Counter[str] = collections.Counter()  # open connections by peer address, this process

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self.transport = LingeringClose(transport, self.loop)  # uvicorn closes through self.transport
        self._head_timer: asyncio.TimerHandle | None = None
        self._peer = (transport.get_extra_info("peername") or ("?",))[0]
        self._peers[self._peer] += 1
        if self._peers[self._peer] > self.per_peer:
            log.warning("refused a connection from %s: it has %d open, at most %d", self._peer, self._peers[self._peer] - 1, self.per_peer)
            transport.close()
            return
        self._arm_head_timer()

    def _arm_head_timer(self) -> None:
        self._disarm_head_timer()
        self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_timed_out)

    def _disarm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if (self.cycle is None or self.cycle.response_complete) and not self.transport.is_closing():
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        if not self.transport.lingering:  # what a closing connection still receives is dropped
            super().data_received(data)

    def on_headers_complete(self) -> None:
        self._disarm_head_timer()
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm_head_timer()  # the next request on this keep-alive connection

    def connection_lost(self, exc) -> None:
        self._disarm_head_timer()
        self._peers[self._peer] -= 1
        if not self._peers[self._peer]:
            del self._peers[self._peer]
        super().connection_lost(exc)


def raise_open_file_limit() -> int:
    """The soft limit on open files raised to the hard one (often 1,024 of 524,288); returns it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open-file limit from %d to %d: %s", soft, hard, exc)
    return soft


async def start_http(app, config: ServerConfig) -> tuple[uvicorn.Server, asyncio.Task, int]:
    """A started uvicorn server for `app` on config.host:config.http_port (HTTPS with config.tls_*)
    on this loop; returns it, its task and the bound port."""
    host, port = config.host, config.http_port
    tls = {}
    if config.tls_cert is not None:
        tls = {"ssl_certfile": str(config.tls_cert), "ssl_keyfile": str(config.tls_key)}
        if config.tls_client_ca is not None:
            tls |= {"ssl_ca_certs": str(config.tls_client_ca), "ssl_cert_reqs": ssl.CERT_REQUIRED}
    raise_open_file_limit()
    server = uvicorn.Server(uvicorn.Config(
        app, host=host, port=port, log_level="warning", lifespan="off", http=GuardedHttpProtocol, **tls,
    ))
    # The runner owns the signals; uvicorn would otherwise install its own handlers.
    server.install_signal_handlers = lambda: None
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()  # raises the bind error
            raise OSError(f"HTTP server on {host}:{port} stopped during start-up")
        await asyncio.sleep(0.02)
    bound = server.servers[0].sockets[0].getsockname()[1]
    return server, task, bound
