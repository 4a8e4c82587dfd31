"""The skeleton every gRPC handler of both APIs shares, written once: the caller's deadline, the
call's bookkeeping (``server.calls``), the answer's reservation held until gRPC has written it, and
the core's ``Code`` as a gRPC status (one table).

A front-end's handler is then its translation only::

    async def Classify(self, request, context):
        return await unary(context, self.core.metrics, "Classify", label, work, images=n)

where ``work(call, deadline)`` returns ``(answer, reservation)``.
"""

from __future__ import annotations

import time
from typing import Awaitable, Callable

import grpc

from cifar10_serving.server.answer_budget import Reservation
from cifar10_serving.server.calls import Call
from cifar10_serving.server.errors import Code, Rejection
from cifar10_serving.server.metrics import Metrics

NO_RESERVATION = Reservation(None, 0)
GRPC_STATUS = {code: grpc.StatusCode[code.name] for code in Code}  # the same names: one-to-one

Work = Callable[[Call, "float | None"], Awaitable[tuple[object, Reservation]]]


def deadline_of(context: grpc.aio.ServicerContext) -> float | None:
    """The call's deadline on ``time.monotonic()``'s clock; None when the caller set none."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


async def unary(context: grpc.aio.ServicerContext, metrics: Metrics, method: str, model: str, work: Work, *,
                images: int = 0, in_flight: bool = True):
    """Runs ``work`` as one call of ``method``: a ``Rejection`` aborts the call with its status; the
    answer's reservation is released once gRPC has written the answer (within the client's
    flow-control window) or the call has ended: grpc.aio runs done callbacks after its last send."""
    deadline = deadline_of(context)
    try:
        with Call(metrics, method, model, images, deadline=deadline, in_flight=in_flight) as call:
            answer, reservation = await work(call, deadline)
    except Rejection as rejection:
        await context.abort(GRPC_STATUS[rejection.code], rejection.message)
    context.add_done_callback(lambda _context: reservation.release())
    return answer


async def lookup(context: grpc.aio.ServicerContext, metrics: Metrics, method: str, model: str,
                 answer: Callable[[], object]):
    """A call that reads what the server has (metadata, lists): counted, refused like any other."""
    async def work(call: Call, deadline: float | None):
        return answer(), NO_RESERVATION

    return await unary(context, metrics, method, model, work, in_flight=False)
