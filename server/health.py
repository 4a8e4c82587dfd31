"""The standard grpc.health.v1 service, of our own: watchers that cannot orphan each other, and
Watch streams that end at shutdown.

Two faults of grpcio's asyncio servicer (``grpc_health.v1.health.aio``) are why this is not a
subclass of it. Its Watch deletes the service's shared ``asyncio.Condition`` when any one watcher
ends, so a client that opened and cancelled a Watch on "" left every other watcher of "" waiting on
a condition nobody notifies: a load balancer never heard NOT_SERVING at SIGTERM (issue 28, finding 7).
And it keeps every Watch open until the server cancels it, so one watcher held ``server.stop(grace)``
for the whole grace. Here the condition is made once and never deleted, and once shutdown has begun
a Watch sends its service's last status (NOT_SERVING, or SERVICE_UNKNOWN) and ends, so the server
stops as soon as its real calls are done.
"""

from __future__ import annotations

import asyncio

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

Status = health_pb2.HealthCheckResponse.ServingStatus


class DrainingHealthServicer(health_pb2_grpc.HealthServicer):
    """Check, Watch, ``set`` and ``enter_graceful_shutdown`` as grpcio's servicer has them; "" (the
    whole server) starts SERVING, as there."""

    def __init__(self) -> None:
        self._statuses: dict[str, Status] = {"": health_pb2.HealthCheckResponse.SERVING}
        # One for every service and every watcher, never replaced: a watcher that leaves takes nothing
        # with it. A status change wakes every watcher; each checks its own service (a few, rarely).
        self._changed = asyncio.Condition()
        self._shutting_down = False

    async def Check(self, request: health_pb2.HealthCheckRequest, context) -> health_pb2.HealthCheckResponse:
        """The service's status; an unknown one is NOT_FOUND, as the standard says (with ``context``
        None, a call from inside the server, SERVICE_UNKNOWN instead)."""
        status = self._statuses.get(request.service)
        if status is None:
            if context is None:
                return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(self, request: health_pb2.HealthCheckRequest, context) -> None:
        """The service's status now, then each change (an unknown service is SERVICE_UNKNOWN until it
        is set); ends once shutdown has begun and its last status has been sent."""
        service, sent = request.service, None
        while True:
            async with self._changed:
                await self._changed.wait_for(lambda: self._status(service) != sent or self._shutting_down)
                status, ending = self._status(service), self._shutting_down
            if status != sent:
                await context.write(health_pb2.HealthCheckResponse(status=status))
                sent = status
            if ending:
                return

    def _status(self, service: str) -> Status:
        return self._statuses.get(service, health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)

    async def set(self, service: str, status: Status) -> None:
        """Sets a service's status and tells its watchers; ignored once shutdown has begun."""
        if self._shutting_down:
            return
        async with self._changed:
            self._statuses[service] = status
            self._changed.notify_all()

    async def enter_graceful_shutdown(self) -> None:
        """Every service NOT_SERVING for good: later ``set`` calls are ignored, and every Watch sends
        its last status and ends."""
        async with self._changed:
            self._shutting_down = True
            for service in self._statuses:
                self._statuses[service] = health_pb2.HealthCheckResponse.NOT_SERVING
            self._changed.notify_all()
