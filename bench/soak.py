"""Soak: mixed load for a set time, watching latency, errors and the server's memory.

    python -m bench.soak                         # 5 minutes, 8 callers
    python -m bench.soak --duration 3600 --interval 60

``--callers`` closed-loop callers send a mix: single images (PNG, JPEG, raw), batches of 8 to 32,
requests for feature maps (one layer, or all of them in float16), short streams, model listings,
health checks, and bad requests that must fail alone (undecodable image, unknown model, top_k 11).
Every ``--interval`` seconds it prints the window's requests, errors by status, p50 and p99 latency
and the server's resident memory; at the end, the totals and the memory drift from the end of the
second window to the last (medians of per-second samples; allocator pools and caches fill during
the first window), and its trend in MB per minute. Exit status 1 when a request
got a status it should not have, the server died, or memory drifted ``--max-drift-mb`` or more.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from bench.inputs import encode, example_arrays
from bench.load import percentile
from bench.procfs import MiB, machine, memory_bytes
from bench.servers import server_args, timed_stop
from cifar10_serving.protos.cifar10.v1 import classifier_pb2 as pb
from cifar10_serving.protos.cifar10.v1 import classifier_pb2_grpc as pb_grpc
from cifar10_serving.server.launcher import ServerProcess

# (kind, weight): what a caller does next
MIX = (("single", 35), ("batch", 15), ("features", 10), ("stream", 10), ("info", 5), ("health", 10), ("bad", 15))
EXPECTED_FAILURES = {"bad": {"INVALID_ARGUMENT", "NOT_FOUND"}}


@dataclass
class Window:
    start: float
    latency: list[float] = field(default_factory=list)
    memory: list[int] = field(default_factory=list)  # the server's resident bytes, sampled each second
    codes: Counter = field(default_factory=Counter)  # "kind: CODE" for every non-OK answer
    unexpected: Counter = field(default_factory=Counter)
    requests: int = 0


class Load:
    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        arrays = example_arrays()
        big = [np.asarray(Image.fromarray(a).resize((96, 96))) for a in arrays]
        self.images = []
        for a, b in zip(arrays, big):
            self.images += [pb.Image(encoded=encode(a, "PNG")), pb.Image(encoded=encode(a, "JPEG")),
                            pb.Image(encoded=encode(b, "JPEG")),
                            pb.Image(raw=pb.RawTensor(shape=[32, 32, 3], layout=pb.LAYOUT_HWC, data=a.tobytes()))]

    def pick(self, n: int) -> list[pb.Image]:
        return [self.images[i] for i in self.rng.integers(0, len(self.images), n)]

    def kind(self, only: set[str] | None = None) -> str:
        kinds, weights = zip(*[(k, w) for k, w in MIX if not only or k in only])
        return str(self.rng.choice(kinds, p=np.array(weights) / sum(weights)))

    def bad(self) -> pb.ClassifyRequest:
        choice = self.rng.integers(3)
        if choice == 0:
            return pb.ClassifyRequest(images=[pb.Image(encoded=self.rng.bytes(500))])
        if choice == 1:
            return pb.ClassifyRequest(images=self.pick(1), model="no-such-model")
        return pb.ClassifyRequest(images=self.pick(1), top_k=11)


async def one(kind: str, load: Load, stub, health) -> int:
    """Does one ``kind`` of call; returns the number of requests it made."""
    if kind == "single":
        await stub.Classify(pb.ClassifyRequest(images=load.pick(1)), timeout=30)
    elif kind == "batch":
        await stub.Classify(pb.ClassifyRequest(images=load.pick(int(load.rng.integers(8, 33)))), timeout=30)
    elif kind == "features":
        layers, dtype = (["*"], pb.DTYPE_FLOAT16) if load.rng.random() < 0.3 else (["stage2.pool"], pb.DTYPE_FLOAT32)
        await stub.Classify(pb.ClassifyRequest(images=load.pick(int(load.rng.integers(1, 5))), feature_layers=layers,
                                               feature_dtype=dtype), timeout=30)
    elif kind == "stream":
        n = int(load.rng.integers(5, 21))
        requests = [pb.ClassifyRequest(images=load.pick(int(load.rng.integers(1, 5))), request_id=str(i))
                    for i in range(n)]
        answers = [r async for r in stub.ClassifyStream(iter(requests), timeout=60)]
        if len(answers) != n or any(a.HasField("error") for a in answers):
            raise RuntimeError("stream answered wrongly")
        return n
    elif kind == "info":
        await (stub.ListModels(pb.ListModelsRequest(), timeout=30) if load.rng.random() < 0.5
               else stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=30))
    elif kind == "health":
        await health.Check(health_pb2.HealthCheckRequest(), timeout=30)
    else:
        await stub.Classify(load.bad(), timeout=30)
    return 1


async def soak(server: ServerProcess, args) -> list[Window]:
    windows = [Window(time.monotonic())]
    stop = windows[0].start + args.duration

    async with grpc.aio.insecure_channel(server.target) as channel:
        stub, health = pb_grpc.ClassifierStub(channel), health_pb2_grpc.HealthStub(channel)

        async def caller(k: int) -> None:
            load = Load(args.seed + k)
            while time.monotonic() < stop:
                kind = load.kind(set(args.only))
                t0 = time.perf_counter()
                try:
                    made = await one(kind, load, stub, health)
                    code = "OK"
                except grpc.RpcError as exc:
                    made, code = 1, exc.code().name
                except RuntimeError:
                    made, code = 1, "WRONG_ANSWER"
                window = windows[-1]
                window.requests += made
                window.latency.append(time.perf_counter() - t0)
                if code != "OK":
                    window.codes[f"{kind}: {code}"] += 1
                    if code not in EXPECTED_FAILURES.get(kind, ()):
                        window.unexpected[f"{kind}: {code}"] += 1
                elif kind in EXPECTED_FAILURES:
                    window.unexpected[f"{kind}: OK"] += 1

        async def sampler() -> None:
            while time.monotonic() < stop and server.alive:
                windows[-1].memory.append(memory_bytes(server.pid))
                await asyncio.sleep(1.0)

        async def reporter() -> None:
            print(f"{'t (s)':>6} {'requests':>9} {'req/s':>7} {'p50 ms':>8} {'p99 ms':>8} {'RSS MB':>15}  non-OK answers")
            while time.monotonic() < stop:
                await asyncio.sleep(min(args.interval, max(0.0, stop - time.monotonic())))
                window = windows[-1]
                windows.append(Window(time.monotonic()))
                seconds = windows[-1].start - window.start
                rss = f"{_median(window.memory) / MiB:.0f} ({min(window.memory, default=0) / MiB:.0f}-" \
                      f"{max(window.memory, default=0) / MiB:.0f})"
                print(f"{windows[-1].start - windows[0].start:6.0f} {window.requests:9,} {window.requests / seconds:7.1f} "
                      f"{1e3 * percentile(window.latency, 50):8.1f} {1e3 * percentile(window.latency, 99):8.1f} "
                      f"{rss:>15}  {dict(window.codes) or '-'}", flush=True)

        await asyncio.gather(sampler(), reporter(), *(caller(k) for k in range(args.callers)))
    return windows[:-1]


def _median(values: list[int]) -> float:
    return float(np.median(values)) if values else 0.0


def _slope_mb_per_minute(windows: list[Window]) -> float:
    """Least-squares slope of the per-second samples after the first window."""
    points = [(w.start + i, m) for w in windows[1:] for i, m in enumerate(w.memory)]
    if len(points) < 2:
        return 0.0
    t, m = np.array(points, dtype=float).T
    return float(np.polyfit(t, m, 1)[0] * 60 / MiB)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n")[0])
    p.add_argument("--duration", type=float, default=300.0, help="seconds of load")
    p.add_argument("--interval", type=float, default=15.0, help="seconds per reported window")
    p.add_argument("--callers", type=int, default=8)
    p.add_argument("--max-drift-mb", type=float, default=50.0)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--models-dir", default=None, help="default: the server's (model/artifacts)")
    p.add_argument("--only", nargs="*", default=[], choices=[k for k, _ in MIX], help="only these kinds of call")
    p.add_argument("--server-env", nargs="*", default=[], metavar="KEY=VALUE",
                   help="extra environment for the server, e.g. MALLOC_ARENA_MAX=2")
    args = p.parse_args(argv)

    print(f"machine: {machine()}")
    env = dict(item.split("=", 1) for item in args.server_env)
    server = ServerProcess(server_args(args.models_dir), env=env)
    try:
        idle = memory_bytes(server.pid)
        windows = asyncio.run(soak(server, args))
        alive = server.alive
    finally:
        exit_seconds = timed_stop(server)
    total = sum(w.requests for w in windows)
    codes = sum((w.codes for w in windows), Counter())
    unexpected = sum((w.unexpected for w in windows), Counter())
    p99s = [1e3 * percentile(w.latency, 99) for w in windows]
    start, end = _median(windows[1].memory), _median(windows[-1].memory)  # the first window warms up
    drift = (end - start) / MiB
    print(f"\nsoak: {args.duration:.0f} s, {args.callers} callers, {total:,} requests "
          f"({total / args.duration:.1f}/s); non-OK answers by kind and status: {dict(codes) or 0}")
    print(f"  unexpected statuses: {dict(unexpected) or 0}; server alive to the end: {alive}; "
          f"exited {exit_seconds:.1f} s after SIGTERM")
    print(f"  p99 per {args.interval:.0f} s window (ms): {', '.join(f'{x:.0f}' for x in p99s)}")
    print(f"  resident memory (median of each window's per-second samples): {idle / MiB:.0f} MB idle, "
          f"{start / MiB:.0f} MB in the second window, {end / MiB:.0f} MB in the last: drift {drift:+.1f} MB "
          f"(limit {args.max_drift_mb:.0f}); trend after the first window {_slope_mb_per_minute(windows):+.2f} MB/min")
    return 0 if alive and not unexpected and drift < args.max_drift_mb else 1


if __name__ == "__main__":
    raise SystemExit(main())
