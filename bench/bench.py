"""Throughput and latency of the service against the two limits that bound it, in one run.

    python -m bench.bench                      # full sweep on the default model, CPU
    python -m bench.bench --quick              # a short run to see that it works
    python -m bench.bench --device cuda        # the GPU path (needs a CUDA machine)
    python -m bench.bench --api v1,v2          # the same sweep through the Open Inference Protocol too
    python -m bench.bench --api v1,v2,http     # and over HTTP: JSON and binary tensors (server.http_api)

In the manner of Triton's perf_analyzer: a closed loop of N concurrent callers per level (1, 2, 4, ...,
64), a warm-up window, then a fixed measurement window. For each level it reports throughput (req/s
and img/s), p50/p90/p95/p99 latency, errors, the load client's own CPU per request, and the mean
batch the server's batcher formed (read from its /metrics). In the same run it measures:

- the raw model: the same TorchScript file, optimised the way the server does it, called in this
  process at batch 64 and each batch size the batcher formed, at the machine's best thread count for
  that batch (each of 1..cores is tried, ``--raw-threads`` to choose others; column ``thr``), not the
  server's ``--torch-threads``: the bound is the machine's, not the configuration's. With
  ``--workers N`` it is the better of that and N processes, each with its share of the cores, as if
  they scaled perfectly (``thr`` then reads threads x processes);
- the gRPC floor: the standard health Check rpc of the same server, same client, same concurrency;
- beside it, when Debian's ``h2load`` (nghttp2-client) is installed, the same rpc driven by that
  native client (``h2floor``; ``bench/h2floor.py``), so the floor is not only a Python client's limit.

With ``--api v1,v2`` each level runs through both APIs in turn, cifar10.v1's Classify and the
Open Inference Protocol's ModelInfer (raw UINT8 ``image`` or BYTES ``encoded_image``, top-1 through
the classification extension, as ``top_k=1`` is for Classify), against the same server and bounds.
With ``http`` too, the same ModelInfer over HTTP/1.1 (aiohttp's client, one keep-alive connection per
caller): raw UINT8 images as JSON data (``json``) and as Triton's binary tensor extension (``binary``),
so the table shows the cost of HTTP, and of JSON, beside gRPC at each level. The older records in
bench/RESULTS.md call cifar10.v1 ``own`` (in ``--api`` and in the ``api`` column); ``--api`` still takes it.

The bound for single-image requests is 1 / (1/raw + 1/floor), the floor from the same Python client
as the requests (the h2load floor is shown beside it, not used in the bound). The server runs as a
separate process (``python -m cifar10_serving.server``) on loopback; the load client is one Python
grpc.aio process, as a real client would be. Writes a table to stdout and JSON and CSV under ``--out``.

This module is the CLI and the bounds; the closed loop and its callers are the library ``bench.load``,
the requests ``bench.inputs``, the server's flags ``bench.servers``.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import grpc
from grpc_health.v1 import health_pb2

from cifar10_serving.protos.cifar10.v1 import classifier_pb2_grpc as pb_grpc
from cifar10_serving.protos.inference import open_inference_grpc_pb2_grpc as v2_grpc
from cifar10_serving.server.launcher import ServerProcess

from bench import h2floor
from bench.inputs import ROOT, make_requests, make_v2_requests
from bench.load import closed_loop, health_calls, http_calls, http_requests, spread, stream_calls, unary_calls, v2_calls
from bench.servers import echo_problems, server_args


@dataclass
class Level:
    mode: str  # single, batch64, stream, floor
    input: str  # png, jpeg, raw, health
    concurrency: int
    requests: int
    images: int
    seconds: float
    req_per_s: float
    img_per_s: float
    p50_ms: float
    p90_ms: float
    p95_ms: float
    p99_ms: float
    errors: int
    client_cpu_us_per_req: float
    mean_batch: float = 0.0
    raw_img_per_s: float = 0.0  # the raw model at the batch size the batcher formed, at the machine's best
    raw_threads: int = 0  # the thread count that best was measured at
    raw_processes: int = 0  # 1, or --workers when that many processes, each with its share of the cores, do better
    floor_req_per_s: float = 0.0  # the health Check rpc, same Python client and concurrency
    h2_floor_req_per_s: float = 0.0  # the same rpc driven by h2load (0: h2load absent)
    bound_img_per_s: float = 0.0
    ratio: float = 0.0  # img/s over the bound (single) or over raw batch-64 (batch64)
    api: str = "v1"  # v1 (cifar10.v1.Classifier), v2 (inference.GRPCInferenceService), http (its REST form); "-": the floor


# ----------------------------------------------------------------------------- the server
def start_server(args) -> ServerProcess:
    """The server on free ports; returns once every worker is serving (its ready file lists their ports)."""
    return ServerProcess(server_args(args.models_dir, device=args.device, max_queue_delay_us=args.max_queue_delay_us,
                                     torch_threads=args.torch_threads, workers=args.workers, instances=args.instances,
                                     default_model=args.model or None), on_line=echo_problems)


def batch_stats(server: ServerProcess, model: str) -> tuple[float, float]:
    """(sum, count) of the batcher's batch-size histogram, over every worker."""
    name = "cifar10_batch_size_images"
    return (server.metric_sum(f"{name}_sum", model=model), server.metric_sum(f"{name}_count", model=model))


# ----------------------------------------------------------------------------- the raw model
class RawModel:
    """The model file in this process, optimised the way the server does it, at the machine's best:
    for each batch size every thread count in ``thread_counts`` is tried and the fastest kept
    (``best[batch]`` says which), whatever the server's own ``--torch-threads``."""

    def __init__(self, path: Path, device: str, thread_counts: Sequence[int], seconds: float = 1.5) -> None:
        import torch

        from cifar10_serving.server.models import load_artifact, resolve_device

        self.torch = torch
        self.device = resolve_device(device)
        self.model = load_artifact(path, self.device)
        self.thread_counts = list(thread_counts)
        self.seconds = seconds
        self.by_threads: dict[int, dict[int, float]] = {}  # batch: {threads: img/s}
        self.cache: dict[int, float] = {}  # batch: the best img/s
        self.best: dict[int, dict] = {}  # batch: {"threads", "processes"} of the best

    def img_per_s(self, batch: int, processes: int = 1) -> float:
        """The best img/s at ``batch``: one process at its best thread count or, for ``processes`` > 1,
        that many each with its share of the cores, as if they scaled perfectly (whichever is more)."""
        if batch not in self.by_threads:
            self.by_threads[batch] = {t: self._measure(batch, t) for t in self.thread_counts}
        rates = self.by_threads[batch]
        threads = max(rates, key=rates.get)
        best = (rates[threads], threads, 1)
        if processes > 1:
            share = min(rates, key=lambda t: abs(t - max(1, usable_cores() // processes)))
            best = max(best, (processes * rates[share], share, processes))
        self.cache[batch], self.best[batch] = best[0], {"threads": best[1], "processes": best[2]}
        return best[0]

    def _measure(self, batch: int, threads: int) -> float:
        torch = self.torch
        torch.set_num_threads(threads)
        x = torch.zeros((batch, *self.model.input_shape), dtype=torch.uint8)
        with torch.inference_mode():
            for _ in range(3):
                self.model.module(x.to(self.device)).cpu()
            n, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < self.seconds:
                self.model.module(x.to(self.device)).cpu()  # same copies as the server's path
                n += 1
            return batch * n / (time.perf_counter() - t0)


def usable_cores() -> int:
    """The cores this process may run on (its affinity, not only the machine's count)."""
    return len(os.sched_getaffinity(0))


# ----------------------------------------------------------------------------- the run
async def sweep(args, server: ServerProcess, model: str) -> list[Level]:
    # One connection per worker (SO_REUSEPORT spreads connections, not calls); callers take turns.
    options = [("grpc.max_receive_message_length", 64 << 20), ("grpc.use_local_subchannel_pool", 1)]
    levels: list[Level] = []
    channels = [grpc.aio.insecure_channel(server.target, options=options) for _ in range(args.workers)]
    try:
        stubs = [pb_grpc.ClassifierStub(channel) for channel in channels]
        v2_stubs = [v2_grpc.GRPCInferenceServiceStub(channel) for channel in channels]
        v1, other = "v1" in args.api, "v2" in args.api
        plans = [("-", "floor", "health", spread([health_calls(channel) for channel in channels]))]
        for kind in args.inputs:  # each level through one API, then the other: both see the same machine
            if v1:
                requests = make_requests(kind, 1, model)
                plans.append(("v1", "single", kind, spread([unary_calls(stub, requests) for stub in stubs])))
            if other:
                requests = make_v2_requests(kind, 1, model)
                plans.append(("v2", "single", kind, spread([v2_calls(stub, requests) for stub in v2_stubs])))
        if "http" in args.api:  # JSON and binary tensors, at the same levels
            for kind, binary in (("json", False), ("binary", True)):
                plans.append(("http", "single", kind, http_calls(server.http_url, model, http_requests(1, binary))))
        for kind in args.inputs[:1]:
            if v1:
                requests, singles = make_requests(kind, 64, model), make_requests(kind, 1, model)
                plans.append(("v1", "batch64", kind, spread([unary_calls(stub, requests) for stub in stubs])))
            if other:
                requests = make_v2_requests(kind, 64, model)
                plans.append(("v2", "batch64", kind, spread([v2_calls(stub, requests) for stub in v2_stubs])))
        if "http" in args.api:
            for kind, binary in (("json", False), ("binary", True)):
                plans.append(("http", "batch64", kind, http_calls(server.http_url, model, http_requests(64, binary))))
        for kind in args.inputs[:1]:
            if v1:  # the v2 API has no streams
                plans.append(("v1", "stream", kind, spread([stream_calls(stub, singles) for stub in stubs])))
        for api, mode, kind, make in plans:
            concurrencies = args.batch_concurrency if mode == "batch64" else args.concurrency
            for c in concurrencies:
                before = batch_stats(server, model)
                result = await closed_loop(make, c, args.warmup, args.duration)
                after = batch_stats(server, model)
                count = after[1] - before[1]
                mean_batch = (after[0] - before[0]) / count if count else 0.0
                level = Level(mode, kind, c, mean_batch=mean_batch, api=api, **result)
                levels.append(level)
                print(f"  {api:<4} {mode:<8} {kind:<6} c={c:<3} {level.img_per_s:8.0f} img/s  p50 {level.p50_ms:6.2f} ms"
                      f"  p99 {level.p99_ms:6.2f} ms  batch {mean_batch:5.1f}  errors {level.errors}", flush=True)
    finally:
        for channel in channels:
            await channel.close()
    return levels


def add_bounds(levels: list[Level], raw: RawModel, workers: int = 1, h2_floor: dict[int, float] | None = None) -> None:
    """The bounds: raw at the machine's best (see ``RawModel.img_per_s``), the floor from the same
    client; ``h2_floor`` (concurrency: req/s from h2load) is shown beside the Python floor."""
    floor = {l.concurrency: l.req_per_s for l in levels if l.mode == "floor"}
    h2_floor = h2_floor or {}
    for level in levels:
        level.h2_floor_req_per_s = h2_floor.get(level.concurrency, 0.0) if level.mode != "batch64" else 0.0
        if level.mode == "floor":
            continue
        batch = 64 if level.mode == "batch64" else max(1, round(level.mean_batch))
        level.raw_img_per_s = raw.img_per_s(batch, workers)
        level.raw_threads, level.raw_processes = raw.best[batch]["threads"], raw.best[batch]["processes"]
        if level.mode == "batch64":
            level.ratio = level.img_per_s / level.raw_img_per_s
        else:
            level.floor_req_per_s = floor.get(level.concurrency, 0.0)
            if level.floor_req_per_s:
                level.bound_img_per_s = 1 / (1 / level.raw_img_per_s + 1 / level.floor_req_per_s)
                level.ratio = level.img_per_s / level.bound_img_per_s


def h2_floors(args, server: ServerProcess, workers: int) -> dict[int, float]:
    """The health Check floor driven by h2load at each concurrency (connections as
    ``h2floor.spread_calls`` opens them); empty when h2load is not installed. Errors go to stderr."""
    if not h2floor.available():
        return {}
    floors = {}
    with tempfile.TemporaryDirectory(prefix="bench-h2-") as tmp:
        body = h2floor.write_message_file(Path(tmp) / "health.bin", health_pb2.HealthCheckRequest().SerializeToString())
        for c in args.concurrency:
            connections, streams = h2floor.spread_calls(c, workers)
            run = h2floor.run_h2load(server, h2floor.HEALTH_CHECK, body, streams=streams, connections=connections,
                                     duration=args.duration, warmup=args.warmup)
            floors[c] = run["req_per_s"]
            print(f"  h2load floor   c={c:<3} {run['req_per_s']:8.0f} req/s  mean {run['mean_ms']:6.2f} ms"
                  f"  errors {run['errors'] + run['h2_failed']}", flush=True)
            if run["errors"] or run["h2_failed"]:
                sys.stderr.write(f"h2load floor c={c}: {run['h2_failed']} failed in h2load, "
                                 f"server codes {run['codes']}\n")
    return floors


def machine(args) -> dict:
    import torch

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "device": args.device, "torch_threads": args.torch_threads, "workers": args.workers,
            "max_queue_delay_us": args.max_queue_delay_us}
    if args.device.startswith("cuda") or (args.device == "auto" and torch.cuda.is_available()):
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def table(levels: list[Level]) -> str:
    head = (f"{'api':<4} {'mode':<8} {'input':<6} {'conc':>4} {'req/s':>8} {'img/s':>8} {'p50ms':>7} {'p90ms':>7} {'p95ms':>7} "
            f"{'p99ms':>7} {'err':>4} {'cli us/req':>10} {'batch':>6} {'raw img/s':>9} {'thr':>4} {'floor':>7} {'h2floor':>7} "
            f"{'bound':>7} {'ratio':>6}")
    rows = [head, "-" * len(head)]
    for l in levels:
        rows.append(f"{l.api:<4} {l.mode:<8} {l.input:<6} {l.concurrency:>4} {l.req_per_s:>8.0f} {l.img_per_s:>8.0f} "
                    f"{l.p50_ms:>7.2f} {l.p90_ms:>7.2f} {l.p95_ms:>7.2f} {l.p99_ms:>7.2f} {l.errors:>4} "
                    f"{l.client_cpu_us_per_req:>10.0f} {l.mean_batch:>6.1f} {l.raw_img_per_s:>9.0f} {threads(l):>4} "
                    f"{l.floor_req_per_s:>7.0f} {l.h2_floor_req_per_s:>7.0f} {l.bound_img_per_s:>7.0f} {l.ratio:>6.2f}")
    return "\n".join(rows)


def threads(level: Level) -> str:
    """The raw bound's thread count, with its process count when more than one: "2", "1x2"."""
    if not level.raw_threads:
        return "-"
    return f"{level.raw_threads}x{level.raw_processes}" if level.raw_processes > 1 else str(level.raw_threads)


def write_results(out: str | Path, name: str, document: dict, rows: list) -> None:
    """``document`` as ``out/NAME-STAMP.json`` and the dataclass ``rows`` as the same name's .csv."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (out / f"{name}-{stamp}.json").write_text(json.dumps(document, indent=1))
    with open(out / f"{name}-{stamp}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(asdict(rows[0])))
        writer.writeheader()
        writer.writerows(asdict(r) for r in rows)
    print(f"wrote {out}/{name}-{stamp}.json and .csv")


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench.bench", description=__doc__.split("\n")[0])
    p.add_argument("--models-dir", default=None, help="default: the server's (model/artifacts)")
    p.add_argument("--model", default="base-max")
    p.add_argument("--device", default="cpu")
    p.add_argument("--torch-threads", type=int, default=0,
                   help="the server's --torch-threads (0: its default, the cores); the raw model tries every count")
    p.add_argument("--workers", type=int, default=1,
                   help="server processes (--workers); the client opens one connection per worker, and the raw "
                        "bound counts one model per worker, as if they scaled perfectly")
    p.add_argument("--instances", type=int, default=0, help="the server's --instances (0: its automatic count)")
    p.add_argument("--max-queue-delay-us", type=int, default=500)
    p.add_argument("--concurrency", default="1,2,4,8,16,32,64")
    p.add_argument("--batch-concurrency", default="1,2,4", help="concurrency levels for 64-image requests")
    p.add_argument("--inputs", default="png,jpeg,raw", help="image encodings for single-image requests")
    p.add_argument("--api", default="v1", help="v1 (cifar10.v1), v2 (the Open Inference Protocol over gRPC), http "
                   "(the same over HTTP, JSON and binary), or several, comma-separated, in one run; own: v1's "
                   "former name, so older commands in bench/RESULTS.md still run")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds per level before measuring")
    p.add_argument("--duration", type=float, default=5.0, help="measurement window per level, seconds")
    p.add_argument("--quick", action="store_true", help="1 s windows, fewer levels")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    p.add_argument("--raw-threads", default=None,
                   help="thread counts to try for the raw model, e.g. 1,2,4,8 (default: each of 1..cores)")
    p.add_argument("--raw-seconds", type=float, default=1.5,
                   help="seconds measured per raw batch size and thread count (--quick: 0.5 at most)")
    args = p.parse_args(argv)
    if args.quick:
        args.warmup, args.duration, args.concurrency, args.inputs = 0.5, 1.0, "1,8,32", "png"
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    args.batch_concurrency = [int(c) for c in args.batch_concurrency.split(",")]
    args.inputs = args.inputs.split(",")
    args.api = ["v1" if api == "own" else api for api in args.api.split(",")]
    args.raw_threads = ([int(t) for t in args.raw_threads.split(",")] if args.raw_threads
                        else list(range(1, usable_cores() + 1)))
    if args.quick:
        args.raw_seconds = min(args.raw_seconds, 0.5)
    if not args.api or set(args.api) - {"v1", "v2", "http"}:
        p.error(f"--api takes v1, v2, http or several of them, not {','.join(args.api)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    info = machine(args)
    print(f"machine: {json.dumps(info)}", flush=True)
    server = start_server(args)
    try:
        levels = asyncio.run(sweep(args, server, args.model))
        native = h2_floors(args, server, args.workers)
    finally:
        server.stop(timeout=30)
    models_dir = Path(args.models_dir) if args.models_dir else ROOT / "model" / "artifacts"
    raw = RawModel(models_dir / f"{args.model}.pt", args.device, args.raw_threads, args.raw_seconds)
    add_bounds(levels, raw, args.workers, native)
    print(table(levels))
    print("raw model img/s by batch and thread count: "
          + json.dumps({b: {t: round(v) for t, v in rates.items()} for b, rates in sorted(raw.by_threads.items())}))
    if not native:
        print("h2load not found (apt-get install nghttp2-client): no native-client floor")
    report = {"machine": info, "model": args.model, "raw_img_per_s": raw.cache, "raw_best": raw.best,
              "raw_img_per_s_by_threads": raw.by_threads, "h2_floor_req_per_s": native,
              "levels": [asdict(l) for l in levels]}
    write_results(args.out, "bench", report, levels)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
