"""The bookkeeping of one call, or one request of a stream: how it ended, its time, its metrics.

Every front-end uses it the same way: the core and the front-end raise ``Rejection`` for what they
refuse, the work runs inside ``Call``, and the front-end decides only what to do with the outcome
(``server.grpc_handlers`` aborts a unary call with the code, or puts an error in a stream's answer)::

    with Call(metrics, "Classify", model, len(images), deadline=deadline, in_flight=True):
        return await work()
"""

from __future__ import annotations

import asyncio
import logging
import time

from cifar10_serving.server.errors import Code, Rejection
from cifar10_serving.server.metrics import METHODS, UNKNOWN_MODEL, Metrics

log = logging.getLogger(__name__)

DEADLINE_SLACK_SECONDS = 0.05  # a cancellation this close to the deadline is the deadline, seen from the caller
INTERNAL_MESSAGE = "internal error; see the server log"  # the details stay in the log, not with the caller


def model_label(name: str, loaded) -> str:
    """The model label for a request naming ``name``: callers choose names, so only loaded ones are kept."""
    return name if name in loaded else UNKNOWN_MODEL


class Call:
    """Times one call or stream request and records how it ended, whatever ends it.

    On leaving the block the status code is: OK; a ``Rejection``'s code; for a cancellation,
    DEADLINE_EXCEEDED if the deadline had (nearly) passed, else CANCELLED; for any other exception
    INTERNAL, logged once with the method name and raised again as a ``Rejection`` with a message
    fit for the caller. It records ``request_seconds`` and ``requests`` by method, model and code,
    and ``images`` by model and outcome. With ``in_flight`` it holds the method's in-flight gauge
    for the block. ``images`` may be set inside the block, when the count is known only there.
    """

    def __init__(self, metrics: Metrics, method: str, model: str, images: int = 0, *,
                 deadline: float | None = None, in_flight: bool = False) -> None:
        if method not in METHODS:  # label values must stay bounded: a new method is declared in metrics
            raise ValueError(f"method {method!r} is not one of server.metrics.METHODS")
        self.metrics = metrics
        self.method = method
        self.model = model
        self.images = images
        self.deadline = deadline  # on time.monotonic()'s clock
        self.code = Code.OK
        self._gauge = metrics.in_flight.labels(method) if in_flight else None
        self._start = 0.0

    def __enter__(self) -> Call:
        if self._gauge is not None:
            self._gauge.inc()
        self._start = time.perf_counter()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        seconds = time.perf_counter() - self._start
        unexpected = isinstance(exc, Exception) and not isinstance(exc, Rejection)
        self.code = self._code(exc)
        if self._gauge is not None:
            self._gauge.dec()
        self._record(seconds)
        if unexpected:
            log.error("%s failed", self.method, exc_info=exc)
            raise Rejection(Code.INTERNAL, INTERNAL_MESSAGE) from exc

    def _code(self, exc: BaseException | None) -> Code:
        if exc is None:
            return Code.OK
        if isinstance(exc, Rejection):
            return exc.code
        if isinstance(exc, asyncio.CancelledError):
            return _cancelled_code(None if self.deadline is None else self.deadline - time.monotonic())
        return Code.INTERNAL

    def _record(self, seconds: float) -> None:
        m, code = self.metrics, self.code.name
        m.request_seconds.labels(self.method, self.model, code).observe(seconds)
        m.requests.labels(self.method, self.model, code).inc()
        if self.images:
            m.images.labels(self.model, "ok" if self.code == Code.OK else code).inc(self.images)


def _cancelled_code(remaining: float | None) -> Code:
    """What the caller of a cancelled handler saw, given the seconds left before its deadline.

    A caller's deadline can reach the server as a cancellation just before the server's copy of the
    deadline (which started when the request arrived) runs out, hence the slack.
    """
    expired = remaining is not None and remaining <= DEADLINE_SLACK_SECONDS
    return Code.DEADLINE_EXCEEDED if expired else Code.CANCELLED
