"""The server's CPU outside the model, measured directly: the real server on a do-nothing model.

    python -m bench.overhead                          # both APIs; raw and JPEG single images, 64-image raw
    python -m bench.overhead --quick                  # a short run to see that it works
    python -m bench.overhead --server-arg=--workers=2 # any server flag, passed through (repeatable)

A model whose forward pass costs next to nothing (``bench/nullmodel.py``: the real models' input and
output shapes) leaves the server's CPU to everything else a call costs: HTTP/2 and protobuf in and
out, decoding, the hop to the batcher's thread and back, response assembly, interceptors, metrics.
That is what bounds a GPU host, and any CPU can measure it. The real server (default flags, plus
``--server-arg``) is loaded in a closed loop by ``bench.load``'s grpc.aio client, and its CPU time
(user + system of every thread of every process in its process group, so ``--workers`` counts too;
/proc/PID/stat) over the measurement window is divided by the calls and by the images answered in
it, beside the bar of issue 16: <= 0.3 ms per single-image request, <= 20 us per image in 64-image
raw requests. The client's own CPU per call is shown too: on a small machine both share the cores.

With Debian's ``h2load`` (nghttp2-client) installed, the same server is then driven by that native
client (``bench/h2floor.py``): the health Check rpc, and Classify (and ModelInfer, with ``--api v2``)
with one raw image and with 64. Its server CPU per call comes without a Python client's limits; the
server's own ``grpc_server_handled_total`` counts give the calls and catch gRPC errors.
Writes a table to stdout and JSON and CSV under ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2

from cifar10_serving.protos.cifar10.v1 import classifier_pb2_grpc as pb_grpc
from cifar10_serving.protos.inference import open_inference_grpc_pb2_grpc as v2_grpc
from cifar10_serving.server.launcher import ServerProcess

from bench import h2floor
from bench.bench import RawModel, batch_stats, write_results
from bench.inputs import ROOT, make_requests, make_v2_requests
from bench.load import closed_loop, health_calls, spread, unary_calls, v2_calls
from bench.nullmodel import NAME, export_null
from bench.servers import echo_problems, server_args

BAR_MS_PER_REQUEST = 0.3  # issue 16: server CPU outside the model per single-image request
BAR_US_PER_IMAGE = 20.0  # issue 16: per image in 64-image raw requests (about 50,000 img/s per core)
MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"


@dataclass
class Row:
    client: str  # python (bench.load's grpc.aio loop) or h2load
    api: str  # v1, v2, or "-" for the health floor
    mode: str  # floor, single, batch64
    input: str  # health, raw, jpeg
    concurrency: int
    requests: int  # python: answered in the window; h2load: the server's handled calls over the whole run
    images: int
    seconds: float  # the window (python) or the whole h2load run, warm-up included: what the CPU is over
    req_per_s: float  # h2load: over its measurement window
    img_per_s: float
    latency_ms: float  # p50 for python; h2load gives only the mean
    p99_ms: float  # nan for h2load
    errors: int
    mean_batch: float
    server_cores: float  # server CPU seconds per second of the window
    server_cpu_ms_per_req: float
    server_cpu_us_per_img: float
    client_cpu_us_per_req: float
    bar: str = ""  # the bar for this row, if it has one
    meets_bar: bool | None = None


# ----------------------------------------------------------------------------- the server's CPU
def group_cpu_seconds(pgid: int) -> float:
    """User + system CPU seconds of every live process in process group ``pgid``, all threads of each
    (a process's /proc/PID/stat counts its threads, exited ones included)."""
    ticks = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited while we looked
        if int(fields[2]) == pgid:
            ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def start_server(extra: list[str], models_dir: Path) -> ServerProcess:
    """The real server on the do-nothing model, default flags otherwise (``extra`` comes last, so it
    wins); in its own session, so its process group is the server and its workers."""
    return ServerProcess([*server_args(models_dir, default_model=NAME), *extra], on_line=echo_problems)


def with_bar(row: Row) -> Row:
    if row.mode == "single":
        row.bar, row.meets_bar = f"<= {BAR_MS_PER_REQUEST} ms/req", row.server_cpu_ms_per_req <= BAR_MS_PER_REQUEST
    elif row.mode == "batch64" and row.input == "raw":
        row.bar, row.meets_bar = f"<= {BAR_US_PER_IMAGE:.0f} us/img", row.server_cpu_us_per_img <= BAR_US_PER_IMAGE
    return row


def per(cpu_seconds: float, count: int, scale: float) -> float:
    return scale * cpu_seconds / count if count else math.nan


# ----------------------------------------------------------------------------- the Python client
async def python_rows(args, server: ServerProcess) -> list[Row]:
    """Each (api, mode, input) at each concurrency, one connection per worker as in ``bench.bench``."""
    options = [("grpc.max_receive_message_length", 64 << 20), ("grpc.use_local_subchannel_pool", 1)]
    channels = [grpc.aio.insecure_channel(server.target, options=options) for _ in server.metrics_ports]
    stubs = [pb_grpc.ClassifierStub(c) for c in channels]
    v2_stubs = [v2_grpc.GRPCInferenceServiceStub(c) for c in channels]
    plans = [("-", "floor", "health", spread([health_calls(c) for c in channels]))]
    for api in args.api:
        for mode, kind, per_request in [*(("single", k, 1) for k in args.inputs), ("batch64", "raw", 64)]:
            if api == "v1":
                requests = make_requests(kind, per_request, NAME)
                plans.append((api, mode, kind, spread([unary_calls(s, requests) for s in stubs])))
            else:
                requests = make_v2_requests(kind, per_request, NAME)
                plans.append((api, mode, kind, spread([v2_calls(s, requests) for s in v2_stubs])))
    meters = {"server_cpu_s": lambda: group_cpu_seconds(server.pid)}
    rows = []
    try:
        for api, mode, kind, make in plans:
            for c in args.batch_concurrency if mode == "batch64" else args.concurrency:
                before = batch_stats(server, NAME)
                r = await closed_loop(make, c, args.warmup, args.duration, meters)
                after = batch_stats(server, NAME)
                count = after[1] - before[1]
                calls, cpu = r["requests"] + r["errors"], r["server_cpu_s"]
                rows.append(report(with_bar(Row(
                    "python", api, mode, kind, c, r["requests"], r["images"], r["seconds"], r["req_per_s"],
                    r["img_per_s"], r["p50_ms"], r["p99_ms"], r["errors"],
                    (after[0] - before[0]) / count if count else 0.0, cpu / r["seconds"],
                    per(cpu, calls, 1e3), per(cpu, r["images"], 1e6), r["client_cpu_us_per_req"]))))
    finally:
        for channel in channels:
            await channel.close()
    return rows


# ----------------------------------------------------------------------------- the native client
def h2load_rows(args, server: ServerProcess, directory: Path) -> list[Row]:
    """h2load on the health Check and on raw single-image and 64-image calls, for each API asked for."""
    workers = len(server.metrics_ports)
    bodies = [("-", "floor", "health", 1, h2floor.HEALTH_CHECK, health_pb2.HealthCheckRequest())]
    for api in args.api:
        for mode, n in (("single", 1), ("batch64", 64)):
            if api == "v1":
                bodies.append((api, mode, "raw", n, h2floor.CLASSIFY, make_requests("raw", n, NAME)[0]))
            else:
                bodies.append((api, mode, "raw", n, MODEL_INFER, make_v2_requests("raw", n, NAME)[0]))
    meters = {"server_cpu_s": lambda: group_cpu_seconds(server.pid)}
    rows = []
    for api, mode, kind, images, method, message in bodies:
        body = h2floor.write_message_file(directory / f"{api}-{mode}.bin", message.SerializeToString())
        for c in args.batch_concurrency if mode == "batch64" else args.concurrency:
            before = batch_stats(server, NAME)
            connections, streams = h2floor.spread_calls(c, workers)
            r = h2floor.run_h2load(server, method, body, streams=streams, connections=connections,
                                   duration=args.duration, warmup=args.warmup, meters=meters)
            after = batch_stats(server, NAME)
            count = after[1] - before[1]
            cpu, calls = r["server_cpu_s"], r["calls"]  # both over the whole run, warm-up included
            rows.append(report(with_bar(Row(
                "h2load", api, mode, kind, c, calls, calls * images, r["wall_s"], r["req_per_s"],
                r["req_per_s"] * images, r["mean_ms"], math.nan, r["errors"] + r["h2_failed"],
                (after[0] - before[0]) / count if count else 0.0, cpu / r["wall_s"],
                per(cpu, calls, 1e3), per(cpu, calls * images, 1e6), per(r["client_cpu_s"], calls, 1e6)))))
            if r["errors"] or r["h2_failed"]:
                sys.stderr.write(f"h2load {method} c={c}: {r['h2_failed']} failed in h2load, "
                                 f"server codes {r['codes']}\n")
    return rows


# ----------------------------------------------------------------------------- reporting
def report(row: Row) -> Row:
    """One progress line per level as it finishes."""
    print(f"  {row.client:<6} {row.api:<3} {row.mode:<7} {row.input:<6} c={row.concurrency:<3} "
          f"{row.req_per_s:8.0f} req/s  server {row.server_cpu_ms_per_req:6.3f} ms/req "
          f"{row.server_cpu_us_per_img:7.1f} us/img  errors {row.errors}", flush=True)
    return row


def table(rows: list[Row]) -> str:
    head = (f"{'client':<6} {'api':<3} {'mode':<7} {'input':<6} {'conc':>4} {'req/s':>7} {'img/s':>8} {'lat ms':>7} "
            f"{'p99ms':>6} {'err':>4} {'batch':>5} {'cores':>5} {'srv ms/req':>10} {'srv us/img':>10} "
            f"{'bar':<15} {'cli us/req':>10}")
    lines = [head, "-" * len(head)]
    for r in rows:
        verdict = "" if r.meets_bar is None else ("ok " if r.meets_bar else "NO ") + r.bar
        cores = f"{r.server_cores:.2f}"
        p99 = "-" if math.isnan(r.p99_ms) else f"{r.p99_ms:.2f}"
        lines.append(f"{r.client:<6} {r.api:<3} {r.mode:<7} {r.input:<6} {r.concurrency:>4} {r.req_per_s:>7.0f} "
                     f"{r.img_per_s:>8.0f} {r.latency_ms:>7.2f} {p99:>6} {r.errors:>4} {r.mean_batch:>5.1f} {cores:>5} "
                     f"{r.server_cpu_ms_per_req:>10.3f} {r.server_cpu_us_per_img:>10.1f} {verdict:<15} "
                     f"{r.client_cpu_us_per_req:>10.0f}")
    lines.append("lat ms: p50 for python, the mean for h2load (it gives no percentiles); cores: server CPU "
                 "seconds per second; srv: the server's CPU per call and per image answered")
    return "\n".join(lines)


def null_forward_us(path: Path) -> dict[int, float]:
    """The do-nothing model's own pass in this process (one thread), microseconds per call at batch 1
    and 64: the part of the server's CPU that is the model after all."""
    raw = RawModel(path, "cpu", [1], seconds=0.5)
    return {b: 1e6 * b / raw.img_per_s(b) for b in (1, 64)}


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench.overhead", description=__doc__.split("\n")[0])
    p.add_argument("--server-arg", action="append", default=[],
                   help="a server flag, passed through; repeat it; write --server-arg=--workers=2")
    p.add_argument("--api", default="v1,v2", help="v1 (cifar10.v1), v2 (the Open Inference Protocol), or v1,v2; "
                   "own: v1's former name, so older commands in bench/RESULTS.md still run")
    p.add_argument("--inputs", default="raw,jpeg", help="image encodings for single-image requests")
    p.add_argument("--concurrency", default="1,8,32", help="callers, for single images and the floor")
    p.add_argument("--batch-concurrency", default="1,4", help="callers for 64-image raw requests")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds per level before measuring")
    p.add_argument("--duration", type=float, default=5.0, help="measurement window per level, seconds")
    p.add_argument("--h2load", choices=("auto", "never"), default="auto",
                   help="auto: the native-client rows too, when h2load is installed")
    p.add_argument("--quick", action="store_true", help="short windows, fewer levels")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = p.parse_args(argv)
    if args.quick:
        args.warmup, args.duration, args.concurrency, args.batch_concurrency = 0.5, 1.5, "1,8", "1"
    args.api, args.inputs = ["v1" if api == "own" else api for api in args.api.split(",")], args.inputs.split(",")
    if not args.api or set(args.api) - {"v1", "v2"}:
        p.error(f"--api takes v1, v2 or v1,v2, not {','.join(args.api)}")
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    args.batch_concurrency = [int(c) for c in args.batch_concurrency.split(",")]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    load = os.getloadavg()
    print(f"{os.cpu_count()} cores, load average {load[0]:.1f} at start; server flags: "
          f"{' '.join(args.server_arg) or '(defaults)'}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-overhead-") as tmp:
        models = Path(tmp) / "models"
        path = export_null(models)
        server = start_server(args.server_arg, models)
        try:
            rows = asyncio.run(python_rows(args, server))
            if args.h2load == "auto" and h2floor.available():
                rows += h2load_rows(args, server, Path(tmp))
            elif args.h2load == "auto":
                print("h2load not found (apt-get install nghttp2-client): no native-client rows")
        finally:
            server.stop(timeout=30)
        forward = null_forward_us(path)
    print(table(rows))
    print(f"the do-nothing pass itself, in this process: {forward[1]:.0f} us at batch 1, "
          f"{forward[64]:.0f} us at batch 64")
    document = {"cores": os.cpu_count(), "load_average_at_start": load, "server_args": args.server_arg,
                "null_forward_us": forward, "bar": {"ms_per_request": BAR_MS_PER_REQUEST,
                                                    "us_per_image": BAR_US_PER_IMAGE},
                "rows": [{k: None if isinstance(v, float) and math.isnan(v) else v for k, v in asdict(r).items()}
                         for r in rows]}  # NaN is not JSON
    write_results(args.out, "overhead", document, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
