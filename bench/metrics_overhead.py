"""What the metrics cost a request: the same server with and without them, under the same load.

    python -m bench.metrics_overhead --models-dir DIR --default-model NAME [--rounds 5] [--calls 1000]

Four variants of the real server, made through ``create_server``'s ``metrics=`` and
``interceptors=``: "off", with the Prometheus metrics replaced by no-ops and the gRPC metrics
interceptor left out; "own", with the cifar10_* metrics but not the interceptor; "hop", "own" plus an
interceptor that does nothing; "on", the server as shipped. The drain gate (and authentication, when
configured) is in all four. They run at once, each in its own process (``--serve VARIANT`` followed by
the server's own flags), and one client sends them single-image Classify calls (the smallest request, so
the metrics are the largest share of it) one at a time, taking turns, so background load falls on
all of them alike. Per variant it prints the median and p99 latency, the median of the per-call
latency differences from "off", and the server's CPU time per request (user plus system, all
threads); then the cost of the metric calls and of the interceptor, each timed alone.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
import timeit
from contextlib import ExitStack, contextmanager
from pathlib import Path

import grpc
import numpy as np

from cifar10_serving.protos.cifar10.v1 import classifier_pb2 as pb
from cifar10_serving.protos.cifar10.v1 import classifier_pb2_grpc as pb_grpc
from cifar10_serving.server.launcher import ServerProcess

from bench.servers import server_args

ROOT = Path(__file__).resolve().parent.parent

# No metrics; the cifar10_* metrics only; those and an interceptor that does nothing; everything, as shipped.
VARIANTS = ("off", "own", "hop", "on")


class _Null:
    """Takes every metric call (``labels(...).observe(...)``, ``with ...time():``) and does nothing."""

    def labels(self, *args, **kwargs):
        return self

    def __getattr__(self, name):
        return lambda *args, **kwargs: self

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        return None


class PassThrough(grpc.aio.ServerInterceptor):
    """An interceptor that does nothing: what having any interceptor at all costs."""

    async def intercept_service(self, continuation, handler_call_details):
        return await continuation(handler_call_details)


class NullMetrics:
    """In place of ``server.metrics.Metrics``: every series is a no-op."""

    def __init__(self) -> None:
        self._null = _Null()

    def add_model(self, name, info) -> None:
        pass

    def __getattr__(self, name):
        return self._null


# ----------------------------------------------------------------------------- the server side
def seams(variant: str) -> dict:
    """``create_server`` keyword arguments for ``variant``."""
    return {"off": {"metrics": NullMetrics(), "interceptors": ()},
            "own": {"interceptors": ()},
            "hop": {"interceptors": (PassThrough(),)},
            "on": {}}[variant]


def serve(variant: str, server_argv: list[str]) -> int:
    """The real server (``server.main.serve``: signals, drain, ``--ready-file``) with ``variant``'s seams."""
    import logging

    from cifar10_serving.server.config import parse_config
    from cifar10_serving.server.main import serve as serve_forever

    config = parse_config(server_argv)
    logging.basicConfig(level=config.log_level, stream=sys.stderr)
    asyncio.run(serve_forever(config, **seams(variant)))
    return 0


# ----------------------------------------------------------------------------- the client side
def request() -> pb.ClassifyRequest:
    data = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8).tobytes()
    return pb.ClassifyRequest(images=[pb.Image(raw=pb.RawTensor(shape=[32, 32, 3], dtype=pb.DTYPE_UINT8,
                                                                layout=pb.LAYOUT_HWC, data=data))])


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process, all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextmanager
def servers(args):
    """One server process per variant, all running at once: {variant: (target, pid)}."""
    flags = server_args(args.models_dir, default_model=args.default_model, metrics_port=-1, log_level="WARNING",
                        grace_period_seconds=1)
    with ExitStack() as stack:
        procs = {}
        for variant in VARIANTS:  # all start at once; then each is waited for
            procs[variant] = stack.enter_context(ServerProcess(
                flags, command=[sys.executable, "-m", "bench.metrics_overhead", "--serve", variant], cwd=ROOT,
                wait=False))
        for proc in procs.values():
            proc.wait_ready(300)
        yield {v: (proc.target, proc.pid) for v, proc in procs.items()}


def measure(targets: dict[str, tuple[str, int]], calls: int) -> dict[str, dict[str, float]]:
    """Sequential calls, taking turns between the servers so that background load hits all alike."""
    req = request()
    channels = {v: grpc.insecure_channel(target) for v, (target, _) in targets.items()}
    stubs = {v: pb_grpc.ClassifierStub(c) for v, c in channels.items()}
    try:
        for stub in stubs.values():
            for _ in range(200):  # warm-up: connections, allocator, caches
                stub.Classify(req, timeout=30)
        latencies = {v: [] for v in stubs}
        cpu = {v: cpu_seconds(pid) for v, (_, pid) in targets.items()}
        order = list(stubs)
        for i in range(calls):
            for v in order[i % len(order):] + order[: i % len(order)]:  # rotate who goes first
                t0 = time.perf_counter()
                stubs[v].Classify(req, timeout=30)
                latencies[v].append(time.perf_counter() - t0)
        cpu = {v: cpu_seconds(pid) - cpu[v] for v, (_, pid) in targets.items()}
    finally:
        for c in channels.values():
            c.close()
    out = {}
    for v, lat in latencies.items():
        diffs = sorted(a - b for a, b in zip(lat, latencies["off"]))
        lat = sorted(lat)
        out[v] = {"p50_ms": 1e3 * statistics.median(lat), "p99_ms": 1e3 * lat[int(0.99 * len(lat))],
                  "paired_diff_ms": 1e3 * statistics.median(diffs), "server_cpu_ms": 1e3 * cpu[v] / calls}
    return out


def metric_calls_per_request() -> float:
    """Seconds spent in the metric calls one single-image Classify request makes, timed alone."""
    from prometheus_client import CollectorRegistry

    from cifar10_serving.server.metrics import Metrics

    m = Metrics(CollectorRegistry())
    m.add_model("m", {"version": "1"})
    in_flight, queue = m.in_flight.labels("Classify"), m.queue_images.labels("m")

    def one():
        in_flight.inc()
        m.preprocess_seconds.labels("m").observe(0.0001)
        queue.set(1)
        queue.set(0)
        m.queue_seconds.labels("m").observe(0.0001)
        m.compute_seconds.labels("m").observe(0.001)
        m.batch_size.labels("m").observe(1)
        in_flight.dec()
        m.request_seconds.labels("Classify", "m", "OK").observe(0.002)
        m.requests.labels("Classify", "m", "OK").inc()
        m.images.labels("m", "ok").inc(1)

    n = 20000
    return min(timeit.repeat(one, number=n, repeat=5)) / n


def interceptor_per_call() -> float:
    """Seconds the gRPC metrics interceptor adds to one unary call, timed alone (no network)."""
    from prometheus_client import CollectorRegistry

    from cifar10_serving.server import grpc_metrics

    interceptor = grpc_metrics.interceptor(CollectorRegistry())

    async def behaviour(request, context):
        return request

    handler = grpc.unary_unary_rpc_method_handler(behaviour)

    class Details:
        method = "/cifar10.v1.Classifier/Classify"

    class Context:
        def code(self):
            return None

    async def continuation(details):
        return handler

    async def calls(n: int, intercepted: bool) -> float:
        context, details = Context(), Details()
        t0 = time.perf_counter()
        for _ in range(n):
            h = await interceptor.intercept_service(continuation, details) if intercepted else await continuation(details)
            await h.unary_unary(b"", context)
        return time.perf_counter() - t0

    n = 20000
    bare = min(asyncio.run(calls(n, False)) for _ in range(5))
    wrapped = min(asyncio.run(calls(n, True)) for _ in range(5))
    return (wrapped - bare) / n


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--serve"]:  # a server process: --serve VARIANT, then the server's own flags
        if len(argv) < 2 or argv[1] not in VARIANTS:
            p.error(f"--serve takes one of {', '.join(VARIANTS)}")
        return serve(argv[1], argv[2:])
    p.add_argument("--models-dir", required=True)
    p.add_argument("--default-model", required=True)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--calls", type=int, default=1000)
    args = p.parse_args(argv)
    results = []
    with servers(args) as targets:
        for i in range(args.rounds):
            results.append(measure(targets, args.calls))
            print(f"round {i + 1}: " + "; ".join(
                f"{v} " + ", ".join(f"{k} {x:.3f}" for k, x in r.items()) for v, r in results[-1].items()), flush=True)
    print(f"\n{os.cpu_count()} CPUs; medians over {args.rounds} rounds of {args.calls} sequential calls to each server")
    for key in ("p50_ms", "p99_ms", "paired_diff_ms", "server_cpu_ms"):
        med = {v: statistics.median(r[v][key] for r in results) for v in VARIANTS}
        print(f"{key:15s} " + "  ".join(f"{v} {med[v]:7.3f}" for v in VARIANTS)
              + ("" if key == "paired_diff_ms" else "   on vs off " + f"{100 * (med['on'] - med['off']) / med['off']:+.1f}%"))
    print(f"metric calls per single-image request, timed alone: {1e6 * metric_calls_per_request():.1f} us")
    print(f"gRPC metrics interceptor per call, timed alone: {1e6 * interceptor_per_call():.1f} us")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
