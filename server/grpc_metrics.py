"""gRPC's standard server metrics, under go-grpc-prometheus's names, from ``py-async-grpc-prometheus``.

One server interceptor per server, on that server's registry, so servers never share state:

- ``grpc_server_started_total``: calls that reached a registered method;
- ``grpc_server_handled_total``: calls finished, by ``grpc_code``;
- ``grpc_server_handling_seconds``: a histogram of time in the handler;
- ``grpc_server_msg_received_total`` and ``grpc_server_msg_sent_total``: stream messages;

each labelled ``grpc_type`` (UNARY, BIDI_STREAMING, ...), ``grpc_service`` and ``grpc_method``. Only
methods the server registered get series (a call to an unknown method never reaches an interceptor's
wrapper), so a caller cannot grow the label set. Calls cancelled by their caller or cut off by their
deadline count as started but never as handled; streams written with ``context.write()`` (the
health service's Watch) are not counted at all (see ``_Interceptor``). Names and labels are the ones go-grpc-prometheus
made common, which existing gRPC dashboards and alerts already query.

Why not gRPC's own OpenTelemetry plugin (``grpcio-observability``, gRFC A66): with ``grpc.aio``
1.85 it deadlocks the whole process under load. Its export thread holds a C++ mutex while running
Python code, and the asyncio server's thread, holding the GIL, waits on that mutex to record a
finished call. A standalone server froze after about 600 calls from 16 client threads. It also
records a request refused for its size as OK. The README's "Metrics and dashboard" section says more.
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
