"""The load generator of the benchmarks: callers in a closed loop, their latencies, and percentiles.

``closed_loop(make, concurrency, warmup, duration)`` runs ``concurrency`` callers back to back for a
warm-up, then a measured window, and summarises what the window saw (requests, images, req/s, img/s,
p50/p90/p95/p99, errors, the client's own CPU per request). ``make`` is a caller maker: awaited, it
gives one caller, a coroutine function that makes one call and returns the images it carried.
``unary_calls``, ``v2_calls``, ``stream_calls`` and ``health_calls`` make them for each gRPC API,
``http_calls`` (with ``http_requests``) for the Open Inference Protocol over HTTP;
``spread`` deals callers out over several makers (one per connection). Used by ``bench.bench`` (its
CLI), ``bench.overhead`` and ``bench.peer``; ``percentile`` by ``bench.overload`` and ``bench.soak``,
whose callers follow their own plans (backoff, a mix of calls).
"""

from __future__ import annotations

import asyncio
import json
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
            except (grpc.aio.AioRpcError, HttpError) as exc:
                ok, n = False, 0
                if state["measuring"]:
                    code = exc.code().name if isinstance(exc, grpc.aio.AioRpcError) else f"HTTP_{exc.status}"
                    errors[code] = errors.get(code, 0) + 1
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


class HttpError(Exception):
    """An HTTP answer other than 200, counted as an error by ``closed_loop``."""

    def __init__(self, status: int) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status


def http_requests(per_request: int, binary: bool, count: int = 8, seed: int = 0) -> list[tuple[bytes, dict, int]]:
    """``count`` Open Inference Protocol HTTP bodies of ``per_request`` random UINT8 images each, top-1
    through the classification extension (as the v2 gRPC requests ask): JSON data, or Triton's binary
    tensor extension (the images after a JSON header, the answer binary too). (body, headers, images)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        images = rng.integers(0, 256, (per_request, 3, 32, 32), dtype=np.uint8)
        tensor = {"name": "image", "shape": list(images.shape), "datatype": "UINT8"}
        probabilities = {"name": "probabilities", "parameters": {"classification": 1, "binary_data": binary}}
        if binary:
            tensor["parameters"] = {"binary_data_size": images.nbytes}
            header = json.dumps({"inputs": [tensor], "outputs": [probabilities]}).encode()
            out.append((header + images.tobytes(), {"Inference-Header-Content-Length": str(len(header)),
                                                    "Content-Type": "application/octet-stream"}, per_request))
        else:
            tensor["data"] = images.ravel().tolist()
            body = json.dumps({"inputs": [tensor], "outputs": [probabilities]}).encode()
            out.append((body, {"Content-Type": "application/json"}, per_request))
    return out


def http_calls(base_url: str, model: str, requests: list[tuple[bytes, dict, int]]):
    """Callers over one aiohttp session: each caller keeps its own keep-alive connection (a closed
    loop of one request at a time), as curl or tritonclient.http callers do."""
    import aiohttp  # the server's dependency; imported here so the gRPC-only commands need not load it

    url = f"{base_url}/v2/models/{model}/infer"
    sessions = []
    counter = [0]

    async def make():
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1),
                                        timeout=aiohttp.ClientTimeout(total=30))
        sessions.append(session)

        async def call() -> int:
            counter[0] += 1
            body, headers, images = requests[counter[0] % len(requests)]
            async with session.post(url, data=body, headers=headers) as response:
                await response.read()
                if response.status != 200:
                    raise HttpError(response.status)
            return images
        return call

    async def close() -> None:
        for session in sessions:
            await session.close()
        sessions.clear()

    make.close = close
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
