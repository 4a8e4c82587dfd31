"""The gate every call to the project's services passes through: a gRPC server interceptor.

It does what the servicer cannot do from inside a handler:

- A message that does not parse as the method's request type is answered INVALID_ARGUMENT (plain
  grpcio answers UNKNOWN). In a stream, the requests before it are answered first.
- On drain, open streams stop reading: every request already read is answered, then the stream
  ends with UNAVAILABLE, and the client resends the rest (to another replica). Without this a busy
  stream is served until the grace period ends and is then cut off mid-request.
- On drain, every new call but health's is answered UNAVAILABLE at once, by a handler: the server
  keeps its port and connections while the calls in flight finish (``idle()`` says when: a call
  counts until gRPC has sent its status), so no call meets gRPC's own shutdown half-way
  (server/main.py ``App.stop``).
"""

from __future__ import annotations

import asyncio
import inspect
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


class DrainGate(grpc.aio.ServerInterceptor):
    """Guards the methods of the given services (``package.Service``) and counts the calls of every
    service in flight; during a drain, refuses new calls to any service but those under
    ``open_prefixes`` (health: probes must see NOT_SERVING)."""

    def __init__(self, service_names: tuple[str, ...],
                 open_prefixes: tuple[str, ...] = ("/grpc.health.v1.Health/",)) -> None:
        self._prefixes = tuple(f"/{name}/" for name in service_names)
        self._open = open_prefixes
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}
        self._draining: asyncio.Future | None = None
        self._in_flight = 0
        self._idle: asyncio.Event | None = None

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None:
            return handler
        if self._draining is not None and self._draining.done() and not details.method.startswith(self._open):
            return refusing(handler, grpc.StatusCode.UNAVAILABLE, REFUSE_MESSAGE)
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
        """Calls that a handler has taken (refusals aside) and whose status gRPC has not yet sent."""
        return self._in_flight

    async def idle(self, timeout: float) -> bool:
        """Waits up to ``timeout`` seconds for no call to be in flight; True once none is."""
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

    def _track(self, context: grpc.aio.ServicerContext) -> None:
        # Done once gRPC has sent the status, not when the handler returns: the answer is sent after.
        self._in_flight += 1
        context.add_done_callback(self._leave)

    def _leave(self, _context=None) -> None:
        self._in_flight -= 1
        if self._in_flight == 0 and self._idle is not None:
            self._idle.set()

    # ------------------------------------------------------------------ wrapping
    def _wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        if not method.startswith(self._prefixes):  # health, reflection: only counted
            kind = f"{'stream' if handler.request_streaming else 'unary'}_{'stream' if handler.response_streaming else 'unary'}"
            return handler._replace(**{kind: self._counted(getattr(handler, kind))})
        message = method.rsplit("/", 1)[-1]
        parse = _lenient(handler.request_deserializer) if handler.request_deserializer else None
        if not handler.request_streaming and not handler.response_streaming:
            return handler._replace(request_deserializer=parse, unary_unary=self._unary(handler.unary_unary, message))
        if handler.request_streaming and handler.response_streaming:
            return handler._replace(request_deserializer=parse,
                                    stream_stream=self._stream(handler.stream_stream, message))
        return handler  # this project has no half-streaming methods

    def _counted(self, behaviour):
        if inspect.isasyncgenfunction(behaviour):
            async def stream(request_or_iterator, context: grpc.aio.ServicerContext):
                self._track(context)
                async for response in behaviour(request_or_iterator, context):
                    yield response

            return stream

        async def call(request_or_iterator, context: grpc.aio.ServicerContext):
            self._track(context)
            return await behaviour(request_or_iterator, context)

        return call

    def _unary(self, behaviour, method: str):
        async def call(request, context: grpc.aio.ServicerContext):
            if isinstance(request, Undecodable):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                    f"the {method} request is not a valid message: {request.reason}")
            self._track(context)
            return await behaviour(request, context)

        return call

    def _stream(self, behaviour, method: str):
        async def call(request_iterator, context: grpc.aio.ServicerContext):
            end = _StreamEnd()
            self._track(context)
            async for response in behaviour(self._requests(request_iterator, end), context):
                yield response
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
