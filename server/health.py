"""The standard grpc.health.v1 service, with Watch streams that end at shutdown.

grpcio's servicer keeps every Watch stream open until the server cancels it, so a single watcher (a
load balancer, a client doing client-side health checking) held ``server.stop(grace)`` for the whole
grace period. Here a watch that has sent NOT_SERVING after shutdown began ends, and the server stops
as soon as its real calls are done.
"""

from __future__ import annotations

import asyncio

from grpc_health.v1 import health, health_pb2


class _Recorder:
    """The servicer context of one Watch, noting when NOT_SERVING went out during shutdown."""

    def __init__(self, context, shutting_down: asyncio.Event) -> None:
        self._context = context
        self._shutting_down = shutting_down
        self.told = asyncio.Event()

    async def write(self, message: health_pb2.HealthCheckResponse) -> None:
        await self._context.write(message)
        if self._shutting_down.is_set() and message.status == health_pb2.HealthCheckResponse.NOT_SERVING:
            self.told.set()

    def __getattr__(self, name: str):
        return getattr(self._context, name)


class DrainingHealthServicer(health.aio.HealthServicer):
    def __init__(self) -> None:
        super().__init__()
        self._shutting_down = asyncio.Event()

    async def enter_graceful_shutdown(self) -> None:
        self._shutting_down.set()  # before the statuses change, so the NOT_SERVING writes count
        await super().enter_graceful_shutdown()

    async def Watch(self, request: health_pb2.HealthCheckRequest, context) -> None:
        recorder = _Recorder(context, self._shutting_down)
        watch = asyncio.ensure_future(super().Watch(request, recorder))
        told = asyncio.ensure_future(recorder.told.wait())
        try:
            await asyncio.wait((watch, told), return_when=asyncio.FIRST_COMPLETED)
        finally:
            told.cancel()
            if not watch.done():
                watch.cancel()
        if watch.done() and not watch.cancelled():
            watch.result()  # surfaces the base servicer's own errors
