"""The load generator of the benchmarks: callers in a closed loop, their latencies, and percentiles.

``closed_loop(make, concurrency, warmup, duration)`` runs ``concurrency`` callers back to back for a
warm-up, then a measured window, and summarises what the window saw (requests, images, req/s, img/s,
p50/p90/p95/p99, errors, the client's own CPU per request). ``make`` is a caller maker: awaited, it
gives one caller, a coroutine function that makes one call and returns the images it carried.
``unary_calls``, ``v2_calls``, ``stream_calls`` and ``health_calls`` make them for each API;
``spread`` deals callers out over several makers (one per connection). Used by ``bench.bench`` (its
CLI), ``bench.overhead`` and ``bench.peer``; ``percentile`` by ``bench.overload`` and ``bench.soak``,
whose callers follow their own plans (backoff, a mix of calls).
"""

from __future__ import annotations

import asyncio
import time
from typing import Callable, Sequence

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cifar10_serving.protos.cifar10.v1 import classifier_pb2 as pb
from cifar10_serving.protos.inference import open_inference_grpc_pb2 as v2


# ----------------------------------------------------------------------------- the closed loop
async def closed_loop(make_call, concurrency: int, warmup: float, duration: float,
                      meters: dict[str, Callable[[], float]] | None = None) -> dict:
    """``make_call()`` returns a coroutine function per worker; each worker calls it back to back.
    ``meters`` (name: a reading, such as another process's CPU seconds) are read as the measurement
    window opens and closes; the result holds each one's change over the window under its name."""
    meters = meters or {}
    state = {"measuring": False, "stop": False}
    latencies: list[float] = []
    errors: dict[str, int] = {}
    done_images = [0]

    async def worker(call) -> None:
        while not state["stop"]:
            t0 = time.perf_counter()
            try:
                n = await call()
                ok = True
            except grpc.aio.AioRpcError as exc:
                ok, n = False, 0
                if state["measuring"]:
                    errors[exc.code().name] = errors.get(exc.code().name, 0) + 1
            if state["measuring"] and ok:
                latencies.append(time.perf_counter() - t0)
                done_images[0] += n

    workers = [asyncio.ensure_future(worker(await make_call())) for _ in range(concurrency)]
    await asyncio.sleep(warmup)
    state["measuring"] = True
    start = {name: read() for name, read in meters.items()}
    cpu0, t0 = time.process_time(), time.perf_counter()
    await asyncio.sleep(duration)
    state["measuring"] = False
    seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    deltas = {name: read() - start[name] for name, read in meters.items()}
    state["stop"] = True
    await asyncio.gather(*workers, return_exceptions=True)
    if hasattr(make_call, "close"):
        await make_call.close()
    n_req = len(latencies)
    return {"requests": n_req, "images": done_images[0], "seconds": seconds,
            "req_per_s": n_req / seconds, "img_per_s": done_images[0] / seconds, **latency_ms(latencies),
            "errors": sum(errors.values()), "client_cpu_us_per_req": 1e6 * cpu / max(1, n_req + sum(errors.values())),
            **deltas}


def latency_ms(seconds: Sequence[float]) -> dict[str, float]:
    """p50, p90, p95 and p99 in milliseconds (numpy's interpolated percentiles; all 0 when empty)."""
    lat = np.array(seconds) * 1e3 if len(seconds) else np.zeros(1)
    return {f"p{q}_ms": float(np.percentile(lat, q)) for q in (50, 90, 95, 99)}


def percentile(values: Sequence[float], q: float) -> float:
    """The nearest-rank ``q``-th percentile of ``values`` (NaN when empty): for the open-loop commands'
    per-status and per-window lists, where no interpolation between two answers is wanted."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


# ----------------------------------------------------------------------------- callers
def unary_calls(stub, requests: list[pb.ClassifyRequest]):
    counter = [0]

    async def make():
        async def call() -> int:
            counter[0] += 1
            request = requests[counter[0] % len(requests)]
            await stub.Classify(request, timeout=30)
            return len(request.images)
        return call
    return make


def v2_calls(stub, requests: list[v2.ModelInferRequest]):
    counter = [0]

    async def make():
        async def call() -> int:
            counter[0] += 1
            request = requests[counter[0] % len(requests)]
            await stub.ModelInfer(request, timeout=30)
            return int(request.inputs[0].shape[0])
        return call
    return make


def stream_calls(stub, requests: list[pb.ClassifyRequest]):
    streams = []

    async def make():
        stream = stub.ClassifyStream(timeout=3600)
        streams.append(stream)
        counter = [0]

        async def call() -> int:
            counter[0] += 1
            request = requests[counter[0] % len(requests)]
            await stream.write(request)
            response = await stream.read()
            if response.HasField("error"):
                raise RuntimeError(response.error.message)
            return len(request.images)
        return call

    async def close() -> None:
        """Half-close each stream and read it to its end, so no call is left for the garbage collector."""
        for stream in streams:
            await stream.done_writing()
            while await stream.read() is not grpc.aio.EOF:
                pass
        streams.clear()

    make.close = close
    return make


def health_calls(channel):
    stub = health_pb2_grpc.HealthStub(channel)
    request = health_pb2.HealthCheckRequest(service="")

    async def make():
        async def call() -> int:
            await stub.Check(request, timeout=30)
            return 1
        return call
    return make


def spread(makers):
    """One caller maker over several: the k-th caller gets a caller of ``makers[k % len(makers)]``."""
    turn = [0]

    async def make():
        turn[0] += 1
        return await makers[turn[0] % len(makers)]()

    async def close() -> None:
        for maker in makers:
            if hasattr(maker, "close"):
                await maker.close()

    make.close = close
    return make
