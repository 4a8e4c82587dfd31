"""Overload: far more concurrent callers than the server can serve, against a bounded queue.

    python -m bench.overload                              # 256 callers for 20 s
    python -m bench.overload --callers 1024 --duration 60

Three phases against one ``python -m cifar10_serving.server`` process: a baseline (a few callers), the overload
(``--callers`` closed-loop callers; a caller refused with RESOURCE_EXHAUSTED backs off
exponentially from ``--backoff-ms`` and tries again, as a client should; ``--deadline-share`` of the requests carry a
short deadline), and a recovery (the baseline load again). It prints, per phase, the answered
requests with their p50/p99 latency, the refused ones with how fast they were refused, and any
other status (there should be none); the server's resident memory before, at its peak and after;
and, from the server's metrics, whether every image it computed was one it answered: requests whose
deadline passed in the queue must be dropped before compute.
"""

from __future__ import annotations

import argparse
import asyncio
import threading
import time
from collections import Counter, defaultdict

import grpc
import numpy as np

from bench.inputs import example_arrays
from bench.load import percentile
from bench.procfs import MiB, cpu_seconds, machine, memory_bytes, reset_peak
from bench.servers import server_args, timed_stop
from cifar10_serving.protos.cifar10.v1 import classifier_pb2 as pb
from cifar10_serving.protos.cifar10.v1 import classifier_pb2_grpc as pb_grpc
from cifar10_serving.server.launcher import ServerProcess

BACKOFF_CAP = 1.0  # seconds


def requests(batch: int) -> list[pb.ClassifyRequest]:
    """Raw 32x32 requests of ``batch`` images from examples/: the cheapest to decode, so the load
    lands on the queue and the model rather than on decoding."""
    arrays = example_arrays()
    images = [pb.Image(raw=pb.RawTensor(shape=[32, 32, 3], layout=pb.LAYOUT_HWC, data=a.tobytes())) for a in arrays]
    return [pb.ClassifyRequest(images=[images[(i + j) % len(images)] for j in range(batch)]) for i in range(len(images))]


class Phase:
    def __init__(self, name: str) -> None:
        self.name = name
        self.latency: dict[str, list[float]] = defaultdict(list)  # status -> seconds
        self.start = self.end = 0.0
        self.computed = 0.0  # images the server computed during the phase
        self.server_cpu = self.client_cpu = 0.0  # CPU seconds used during the phase

    def line(self, images_per_request: int) -> str:
        seconds = self.end - self.start
        ok = self.latency["OK"]
        parts = [f"{self.name:<9} {seconds:5.1f} s (CPU cores busy: server {self.server_cpu / seconds:.2f}, "
                 f"client {self.client_cpu / seconds:.2f})  answered {len(ok):6,} ({len(ok) * images_per_request / seconds:6.0f} img/s)"
                 f" p50 {1e3 * percentile(ok, 50):6.1f} ms p99 {1e3 * percentile(ok, 99):7.1f} ms"]
        for code, values in sorted(self.latency.items()):
            if code != "OK":
                parts.append(f"{code} {len(values):,} (p50 {1e3 * percentile(values, 50):.1f} ms, "
                             f"p99 {1e3 * percentile(values, 99):.1f} ms)")
        return "; ".join(parts)


async def run_phase(stub, phase: Phase, reqs, callers: int, seconds: float, backoff: float,
                    deadline_share: float, deadline: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    stop = time.monotonic() + seconds

    async def caller(k: int) -> None:
        i, refusals = k, 0
        while time.monotonic() < stop:
            i += 1
            timeout = deadline if rng.random() < deadline_share else 30.0
            t0 = time.perf_counter()
            try:
                await stub.Classify(reqs[i % len(reqs)], timeout=timeout)
                code = "OK"
            except grpc.RpcError as exc:
                code = exc.code().name
            phase.latency[code].append(time.perf_counter() - t0)
            refusals = refusals + 1 if code == "RESOURCE_EXHAUSTED" else 0
            if refusals:  # exponential backoff with jitter, as a well-behaved client does
                await asyncio.sleep(min(BACKOFF_CAP, backoff * 2 ** (refusals - 1)) * (0.5 + rng.random()))

    phase.start = time.monotonic()
    await asyncio.gather(*(caller(k) for k in range(callers)))
    phase.end = time.monotonic()


def server_quantiles(server: ServerProcess, code: str) -> tuple[float, float, float]:
    """(count, p50, p99) of the server's own Classify latency for ``code``, as bucket upper bounds."""
    buckets = sorted((float(dict(labels)["le"]), value) for (name, labels), value in server.metrics().items()
                     if name == "cifar10_request_duration_seconds_bucket"
                     and ("code", code) in labels and ("method", "Classify") in labels)
    total = buckets[-1][1] if buckets else 0.0
    bound = lambda q: next((le for le, n in buckets if n >= q * total), float("nan"))
    return total, bound(0.5), bound(0.99)


def sample_memory(server: ServerProcess, samples: list[int], stop: threading.Event) -> None:
    while not stop.wait(0.5):
        if server.alive:
            samples.append(memory_bytes(server.pid))


async def drive(server: ServerProcess, args) -> list[Phase]:
    reqs = requests(args.batch)
    async with grpc.aio.insecure_channel(server.target) as channel:
        stub = pb_grpc.ClassifierStub(channel)
        await run_phase(stub, Phase("warm-up"), reqs, args.base_callers, 2.0, args.backoff_ms / 1e3, 0, 1, 0)
        phases = [Phase("baseline"), Phase("overload"), Phase("recovery")]
        plan = [(args.base_callers, args.phase_seconds, 0.0), (args.callers, args.duration, args.deadline_share),
                (args.base_callers, args.phase_seconds, 0.0)]
        for seed, (phase, (callers, seconds, share)) in enumerate(zip(phases, plan)):
            computed = server.metric_sum("cifar10_batch_size_images_sum")
            server_cpu, client_cpu = cpu_seconds(server.pid), cpu_seconds()
            await run_phase(stub, phase, reqs, callers, seconds, args.backoff_ms / 1e3, share,
                            args.deadline_ms / 1e3, seed + 1)
            phase.server_cpu, phase.client_cpu = cpu_seconds(server.pid) - server_cpu, cpu_seconds() - client_cpu
            await asyncio.sleep(1.0)  # the queue empties of calls whose callers gave up
            phase.computed = server.metric_sum("cifar10_batch_size_images_sum") - computed
        return phases


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.overload", description=__doc__.split("\n")[0])
    p.add_argument("--callers", type=int, default=256, help="concurrent callers during the overload")
    p.add_argument("--base-callers", type=int, default=4, help="callers in the baseline and recovery phases")
    p.add_argument("--duration", type=float, default=20.0, help="seconds of overload")
    p.add_argument("--phase-seconds", type=float, default=5.0, help="seconds of baseline and of recovery")
    p.add_argument("--batch", type=int, default=8, help="images per request")
    p.add_argument("--max-queue-images", type=int, default=256, help="the server's queue bound")
    p.add_argument("--backoff-ms", type=float, default=50.0, help="first backoff of a refused caller; doubles up to 1 s")
    p.add_argument("--deadline-share", type=float, default=0.1, help="share of overload requests with a short deadline")
    p.add_argument("--deadline-ms", type=float, default=100.0)
    p.add_argument("--torch-threads", type=int, default=1)
    p.add_argument("--models-dir", default=None, help="default: the server's (model/artifacts)")
    args = p.parse_args(argv)

    print(f"machine: {machine()}")
    server = ServerProcess(server_args(args.models_dir, max_queue_images=args.max_queue_images,
                                       torch_threads=args.torch_threads))
    samples: list[int] = []
    stop_sampling = threading.Event()
    try:
        before = memory_bytes(server.pid)
        reset_peak(server.pid)
        threading.Thread(target=sample_memory, args=(server, samples, stop_sampling), daemon=True).start()
        phases = asyncio.run(drive(server, args))
        stop_sampling.set()
        after, peak, alive = memory_bytes(server.pid), memory_bytes(server.pid, "VmHWM"), server.alive
        server_side = {code: server_quantiles(server, code) for code in ("OK", "RESOURCE_EXHAUSTED")}
        dropped = {r: server.metric_sum("cifar10_dropped_requests_total", reason=r) for r in ("deadline", "cancelled")}
    finally:
        stop_sampling.set()
        exit_seconds = timed_stop(server)

    overload = phases[1]
    answered_images = len(overload.latency["OK"]) * args.batch
    print(f"server: {args.max_queue_images} queued images at most, {args.torch_threads} torch thread(s); "
          f"client: {args.callers} callers during the overload, {args.batch} images per request, "
          f"{args.deadline_share:.0%} with a {args.deadline_ms:.0f} ms deadline")
    for phase in phases:
        print("  " + phase.line(args.batch))
    other = Counter({code: len(v) for phase in phases for code, v in phase.latency.items()
                     if code not in ("OK", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED")})
    print(f"  statuses other than OK, RESOURCE_EXHAUSTED and DEADLINE_EXCEEDED: {dict(other) or 0}")
    print(f"  overload: images computed {overload.computed:,.0f}, answered OK {answered_images:,} "
          f"(the difference: requests whose deadline passed during their forward pass); of the "
          f"{len(overload.latency['DEADLINE_EXCEEDED']):,} requests past their deadline the batcher dropped "
          f"{dropped['deadline']:.0f} from its queue and {dropped['cancelled']:.0f} cancelled ones; the rest "
          f"never reached it")
    for code, (count, p50, p99) in server_side.items():
        print(f"  server side, whole run, {code}: {count:,.0f} Classify calls, p50 <= {1e3 * p50:g} ms, "
              f"p99 <= {1e3 * p99:g} ms (histogram bucket bounds)")
    print(f"  server resident memory: {before / MiB:.0f} MB before, peak {peak / MiB:.0f} MB, {after / MiB:.0f} MB after "
          f"(samples every 0.5 s: min {min(samples) / MiB:.0f}, max {max(samples) / MiB:.0f} MB); "
          f"alive: {alive}; exited {exit_seconds:.1f} s after SIGTERM")
    return 0 if alive and not other else 1


if __name__ == "__main__":
    raise SystemExit(main())
