"""gRPC's standard server metrics, under go-grpc-prometheus's names, from ``py-async-grpc-prometheus``.

One server interceptor per server, on that server's registry, so servers never share state. It
counts ``grpc_server_started_total``, ``grpc_server_handled_total`` (by ``grpc_code``),
``grpc_server_handling_seconds`` and the stream messages, each by ``grpc_type``, ``grpc_service`` and
``grpc_method``; only registered methods get series, so a caller cannot grow the label set. Names
are go-grpc-prometheus's because existing gRPC dashboards and alerts query them.

Why not gRPC's own OpenTelemetry plugin (``grpcio-observability``): with ``grpc.aio`` it deadlocked
the server under load. That, and what these numbers leave out (cancelled calls, streams written with
``context.write()``), is in docs/metrics.md, "Why these gRPC metrics".
"""

from __future__ import annotations

import inspect

import grpc
from prometheus_client import CollectorRegistry
from py_async_grpc_prometheus.prometheus_async_server_interceptor import PromAsyncServerInterceptor


class _Interceptor(PromAsyncServerInterceptor):
    def _wrap_rpc_behavior(self, handler, fn):
        # The library wraps every streaming response as an async generator. A handler that streams
        # with context.write() instead, as grpc.health's Watch does, is a plain coroutine and would
        # fail with UNKNOWN: such handlers are passed through unwrapped, and so are not counted.
        if handler is not None and handler.response_streaming:
            behavior = handler.stream_stream if handler.request_streaming else handler.unary_stream
            if not inspect.isasyncgenfunction(behavior):
                return handler
        return super()._wrap_rpc_behavior(handler, fn)


def interceptor(registry: CollectorRegistry) -> grpc.aio.ServerInterceptor:
    """The metrics interceptor for one server; put it first so it also counts calls later ones refuse."""
    metrics = _Interceptor(enable_handling_time_histogram=True, registry=registry)
    # The library always registers its legacy latency histogram, which it only fills with legacy=True:
    # left in, /metrics would carry an empty grpc_server_handled_latency_seconds family.
    legacy = metrics._metrics.pop("legacy_grpc_server_handled_latency_seconds", None)
    if legacy is not None:
        registry.unregister(legacy)
    return metrics
