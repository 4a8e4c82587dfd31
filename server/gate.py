"""The gate every call to one service passes through: a gRPC server interceptor.

It does two things the servicer cannot do from inside a handler:

- A message that does not parse as the method's request type is answered INVALID_ARGUMENT (plain
  grpcio answers UNKNOWN). In a stream, the requests before it are answered first.
- On drain, open streams stop reading: every request already read is answered, then the stream
  ends with UNAVAILABLE, and the client resends the rest (to another replica). Without this a busy
  stream is served until the grace period ends and is then cut off mid-request.
- On drain, every new call but health's is answered UNAVAILABLE at once, by a handler: the server
  keeps its port and connections while the calls in flight finish (``idle()`` says when), so no call
  meets gRPC's own shutdown half-way (server/main.py ``App.stop``).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import grpc
from google.protobuf.message import DecodeError

DRAIN_MESSAGE = ("the server is shutting down: requests after the last answer on this stream were not read; "
                 "send them again on a new call")
REFUSE_MESSAGE = "the server is shutting down and took no new calls: send the call again (to another replica)"


@dataclass(frozen=True)
class Undecodable:
    """Stands in for a request message that failed to parse."""

    reason: str


def _lenient(deserialize):
    def parse(data: bytes):
        try:
            return deserialize(data)
        except DecodeError as exc:
            return Undecodable(str(exc) or "not a protobuf message")

    return parse


@dataclass
class _StreamEnd:
    error: str | None = None  # the stream sent an undecodable message
    cut: bool = False  # the drain stopped reading


class Gate(grpc.aio.ServerInterceptor):
    """Guards the methods of one service (``/package.Service/``); during a drain, refuses new calls
    to any service but those under ``open_prefixes`` (health: probes must see NOT_SERVING)."""

    def __init__(self, service_name: str, open_prefixes: tuple[str, ...] = ("/grpc.health.v1.Health/",)) -> None:
        self._prefix = f"/{service_name}/"
        self._open = open_prefixes
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}
        self._draining: asyncio.Future | None = None
        self._in_flight = 0
        self._idle: asyncio.Event | None = None

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None or details.method.startswith(self._open):
            return handler
        if self._draining is not None and self._draining.done():
            return refusing(handler, grpc.StatusCode.UNAVAILABLE, REFUSE_MESSAGE)
        if not details.method.startswith(self._prefix):
            return handler
        wrapped = self._wrapped.get(details.method)
        if wrapped is None:
            wrapped = self._wrapped[details.method] = self._wrap(handler, details.method)
        return wrapped

    def drain(self) -> None:
        """Open streams, and streams opened from now on, stop reading new requests; new calls are refused."""
        draining = self._drain_signal()
        if not draining.done():
            draining.set_result(None)

    @property
    def in_flight(self) -> int:
        """Calls of the guarded service whose handler is running."""
        return self._in_flight

    async def idle(self, timeout: float) -> bool:
        """Waits up to ``timeout`` seconds for the guarded service to have no call running; True once it has."""
        if self._idle is None:
            self._idle = asyncio.Event()
        if self._in_flight == 0:
            return True
        self._idle.clear()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    def _enter(self) -> None:
        self._in_flight += 1

    def _leave(self) -> None:
        self._in_flight -= 1
        if self._in_flight == 0 and self._idle is not None:
            self._idle.set()

    # ------------------------------------------------------------------ wrapping
    def _wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        message = method.rsplit("/", 1)[-1]
        parse = _lenient(handler.request_deserializer) if handler.request_deserializer else None
        if not handler.request_streaming and not handler.response_streaming:
            return handler._replace(request_deserializer=parse, unary_unary=self._unary(handler.unary_unary, message))
        if handler.request_streaming and handler.response_streaming:
            return handler._replace(request_deserializer=parse,
                                    stream_stream=self._stream(handler.stream_stream, message))
        return handler  # this project has no half-streaming methods

    def _unary(self, behaviour, method: str):
        async def call(request, context: grpc.aio.ServicerContext):
            if isinstance(request, Undecodable):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                    f"the {method} request is not a valid message: {request.reason}")
            self._enter()
            try:
                return await behaviour(request, context)
            finally:
                self._leave()

        return call

    def _stream(self, behaviour, method: str):
        async def call(request_iterator, context: grpc.aio.ServicerContext):
            end = _StreamEnd()
            self._enter()
            try:
                async for response in behaviour(self._requests(request_iterator, end), context):
                    yield response
            finally:
                self._leave()
            if end.error is not None:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{method} stream: {end.error}")
            if end.cut:
                await context.abort(grpc.StatusCode.UNAVAILABLE, DRAIN_MESSAGE)

        return call

    async def _requests(self, iterator, end: _StreamEnd):
        """The stream's requests until the client ends it, a message fails to parse, or a drain."""
        draining = self._drain_signal()
        index, read = 0, None
        try:
            while not draining.done():
                read = asyncio.ensure_future(iterator.__anext__())
                await asyncio.wait((read, draining), return_when=asyncio.FIRST_COMPLETED)
                if not read.done():
                    break
                try:
                    request = read.result()
                except StopAsyncIteration:
                    return
                if isinstance(request, Undecodable):
                    end.error = (f"message {index} is not a valid request ({request.reason}); "
                                 "the ones before it were answered")
                    return
                yield request
                index += 1
            end.cut = True
        finally:
            if read is not None and not read.done():
                read.cancel()

    def _drain_signal(self) -> asyncio.Future:
        if self._draining is None:
            self._draining = asyncio.get_running_loop().create_future()
        return self._draining


def refusing(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    """A handler that answers ``code`` without running anything or reading the request: it takes the
    requests as a stream (on the wire a unary request is the same), so grpc.aio does not receive and
    parse a message first, however large, and the client's is cut off by the status."""

    async def refuse(_request_iterator, context: grpc.aio.ServicerContext):
        await context.abort(code, message)

    behaviours = dict.fromkeys(("unary_unary", "unary_stream", "stream_unary", "stream_stream"))
    behaviours["stream_stream" if handler.response_streaming else "stream_unary"] = refuse
    return handler._replace(request_streaming=True, request_deserializer=None, **behaviours)
