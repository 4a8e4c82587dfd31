"""The HTTP listener of the Open Inference Protocol's REST form: aiohttp on the server's event loop,
with the limits the gRPC port has (server/main.py ``connection_options``) and TLS from the same files.

aiohttp bounds a request's size and header lines, and closes keep-alive connections left idle, but
it gives a client unlimited time to send a request's head and accepts any number of connections. So
each connection's protocol is wrapped (``_Guarded``): a new connection, and a request whose first
byte has arrived, must complete the request's head within ``header_timeout`` (as gRPC's handshake
timeout); a connection with no request for ``idle_timeout`` is closed (gRPC's idle timeout); over
``max_connections`` a connection is answered 503 and closed at once. A body's time is bounded by
the request handler (``server.http_api``), which reads it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import ssl
import time
from dataclasses import dataclass

from aiohttp import web

from cifar10_serving.server.config import ServerConfig

log = logging.getLogger(__name__)

SWEEP_SECONDS = 0.5  # how often deadlines are checked: a connection lives at most a timeout plus this
# The refusal over the connection cap, written on the raw transport before anything is read.
FULL = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nConnection: close\r\n"
        b"Retry-After: 1\r\nContent-Length: 61\r\n\r\n"
        b'{"error":"the server has too many HTTP connections; retry"}\r\n')
assert len(FULL.partition(b"\r\n\r\n")[2]) == 61


@dataclass(frozen=True)
class Limits:
    max_connections: int
    header_timeout: float  # seconds; math.inf: never
    idle_timeout: float

    @staticmethod
    def of(config: ServerConfig) -> Limits:
        def seconds(ms: int) -> float:
            return ms / 1000 if ms > 0 else math.inf

        return Limits(config.http_max_connections, seconds(config.http_header_timeout_ms),
                      seconds(config.http_idle_timeout_ms))


class _Guarded(asyncio.Protocol):
    """One connection: aiohttp's protocol inside, with the connection's deadlines beside it."""

    def __init__(self, inner: asyncio.Protocol, listener: Listener) -> None:
        self.inner = inner
        self.listener = listener
        self.transport: asyncio.Transport | None = None
        self.busy = 0  # requests whose head has arrived and whose answer is not yet written
        self.head_since: float | None = None  # waiting for a request's head since then
        self.idle_since = time.monotonic()

    def connection_made(self, transport) -> None:
        self.transport = transport
        if not self.listener.admit(self):
            transport.write(FULL)
            transport.close()
            return
        self.head_since = time.monotonic()  # a new connection owes its first request's head
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if not self.busy and self.head_since is None:
            self.head_since = time.monotonic()
        self.inner.data_received(data)

    def eof_received(self):
        return self.inner.eof_received()

    def connection_lost(self, exc) -> None:
        if self.listener.forget(self):
            self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    # ------------------------------------------------------------------ told by the request handler
    def request_started(self) -> None:
        self.busy += 1
        self.head_since = None

    def request_finished(self) -> None:
        self.busy -= 1
        self.idle_since = time.monotonic()

    def expired(self, now: float, limits: Limits) -> str | None:
        if self.busy:
            return None
        if self.head_since is not None:
            return "header" if now - self.head_since > limits.header_timeout else None
        return "idle" if now - self.idle_since > limits.idle_timeout else None


class Listener:
    """The listening socket and its connections; ``close`` stops both."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.connections: dict[asyncio.BaseTransport, _Guarded] = {}
        self._server: asyncio.AbstractServer | None = None
        self._sweeper: asyncio.Task | None = None

    async def open(self, handler: web.Server, host: str, port: int, ssl_context: ssl.SSLContext | None,
                   reuse_port: bool) -> int:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Guarded(handler(), self), host or None, port,
                                                ssl=ssl_context, reuse_port=reuse_port or None, backlog=128)
        self._sweeper = asyncio.ensure_future(self._sweep())
        return self._server.sockets[0].getsockname()[1]

    def admit(self, connection: _Guarded) -> bool:
        if len(self.connections) >= self.limits.max_connections:
            return False
        self.connections[connection.transport] = connection
        return True

    def forget(self, connection: _Guarded) -> bool:
        """Whether ``connection`` was admitted (and aiohttp's protocol must hear of its end)."""
        return self.connections.pop(connection.transport, None) is not None

    def of(self, transport) -> _Guarded | None:
        return self.connections.get(transport)

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_SECONDS)
            now = time.monotonic()
            for transport, connection in list(self.connections.items()):
                why = connection.expired(now, self.limits)
                if why is not None:
                    log.debug("closing an HTTP connection: %s timeout", why)
                    transport.abort()  # nothing is owed to a client that sent no complete request

    def stop_listening(self) -> None:
        if self._server is not None:
            self._server.close()

    async def close(self) -> None:
        """Stops accepting, then closes every connection (their requests have been answered)."""
        self.stop_listening()
        if self._sweeper is not None:
            self._sweeper.cancel()
        for transport in list(self.connections):
            transport.close()
        if self._server is not None:
            await self._server.wait_closed()


def ssl_context(config: ServerConfig) -> ssl.SSLContext | None:
    """TLS from the gRPC port's files (server/security.py reads the same): mutual with a client CA."""
    if not config.tls_cert_file:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(config.tls_cert_file, config.tls_key_file)
    if config.tls_client_ca_file:
        context.load_verify_locations(config.tls_client_ca_file)
        context.verify_mode = ssl.CERT_REQUIRED
    context.set_alpn_protocols(["http/1.1"])
    return context
