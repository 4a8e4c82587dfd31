"""The native-client floor: unary gRPC calls driven by Debian's ``h2load`` (nghttp2-client), not Python.

A Python grpc.aio client tops out near the server's own speed on a small machine, so a floor measured
with it is partly the client's. ``h2load`` is a C HTTP/2 load generator: given a file holding one
gRPC message (``\\x00``, a 4-byte big-endian length, the serialized protobuf) and gRPC's two request
headers (and a ``grpc-timeout``), it POSTs that body over h2c as fast as the server answers. It reads
only the HTTP status, and a gRPC error still comes back as HTTP 200 (the code is in the trailers),
so every run is paired with the server's own ``grpc_server_handled_total`` counts, read before and
after: calls the server did not answer OK are the errors.

    run_h2load(server, HEALTH_CHECK, write_message_file("health.bin", b""), streams=8, duration=5)

``apt-get install -y nghttp2-client`` provides it; ``available()`` says whether it is here.
"""

from __future__ import annotations

import re
import resource
import shutil
import struct
import subprocess
import time
from pathlib import Path
from typing import Callable

from cifar10_serving.server.launcher import ServerProcess

# gRPC's two request headers, and a deadline as bench.load's calls carry (timeout=30), so that both
# clients take the same path through the server (it reads each call's deadline).
GRPC_HEADERS = ("content-type: application/grpc", "te: trailers", "grpc-timeout: 30S")
HANDLED = "grpc_server_handled_total"
HEALTH_CHECK = "/grpc.health.v1.Health/Check"
CLASSIFY = "/cifar10.v1.Classifier/Classify"


def available() -> str | None:
    """The path of ``h2load``, or None when nghttp2-client is not installed."""
    return shutil.which("h2load")


def grpc_message(message: bytes) -> bytes:
    """One message as gRPC frames it on the wire: uncompressed flag, big-endian length, the bytes."""
    return b"\x00" + struct.pack(">I", len(message)) + message


def write_message_file(path: str | Path, message: bytes) -> Path:
    """A request body for ``h2load -d``: the serialized ``message``, framed."""
    path = Path(path)
    path.write_bytes(grpc_message(message))
    return path


def spread_calls(concurrency: int, workers: int) -> tuple[int, int]:
    """(connections, streams on each) for ``concurrency`` calls in flight on a server of ``workers``
    processes: one connection per worker as the Python client opens them (the kernel spreads
    connections, not calls), never more than there are calls; rounded up where they do not divide."""
    connections = max(1, min(workers, concurrency))
    return connections, -(-concurrency // connections)


def handled(server: ServerProcess, method: str) -> dict[str, float]:
    """The server's count of finished calls of ``method`` (``/package.Service/Method``) by gRPC code,
    summed over every worker."""
    service, name = method.strip("/").split("/")
    counts: dict[str, float] = {}
    for i in range(len(server.metrics_ports)):
        for (metric, labels), value in server.metrics(i).items():
            labels = dict(labels)
            if metric == HANDLED and labels.get("grpc_service") == service and labels.get("grpc_method") == name:
                counts[labels["grpc_code"]] = counts.get(labels["grpc_code"], 0.0) + value
    return counts


def parse_report(text: str) -> dict:
    """What ``h2load`` printed: req/s over its measurement window, the request counts, and the mean
    time per request (it gives no percentiles)."""
    rate = re.search(r"finished in [\d.]+m?s, ([\d.]+) req/s", text)
    counts = re.search(r"requests: (\d+) total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed, "
                       r"(\d+) errored, (\d+) timeout", text)
    mean = re.search(r"time for request:\s+\S+\s+\S+\s+([\d.]+)(us|ms|s)\b", text)
    if not (rate and counts and mean):
        raise RuntimeError(f"h2load printed no report:\n{text[-2000:]}")
    total, done, ok, failed, errored, timeout = map(int, counts.groups())
    scale = {"us": 1e-3, "ms": 1.0, "s": 1e3}[mean.group(2)]
    return {"req_per_s": float(rate.group(1)), "h2_requests": done, "h2_failed": failed + errored + timeout,
            "mean_ms": float(mean.group(1)) * scale}


def run_h2load(server: ServerProcess, method: str, body: Path, *, streams: int, connections: int = 1,
               duration: float = 5.0, warmup: float = 1.0,
               meters: dict[str, Callable[[], float]] | None = None) -> dict:
    """``connections`` h2c connections with ``streams`` calls in flight on each, for ``warmup`` then
    ``duration`` seconds. Returns h2load's figures, the server's handled calls over the whole run
    (``calls``, and ``errors``: those not OK), the run's ``wall_s`` and h2load's own CPU seconds over
    it, and the change of each of ``meters`` over the same run, so a meter divided by ``calls`` is a
    cost per call."""
    meters = meters or {}
    url = f"http://{server.target}{method}"
    argv = [available() or "h2load", "-c", str(connections), "-m", str(streams), "-D", f"{round(duration * 1e3)}ms",
            "--warm-up-time", f"{round(warmup * 1e3)}ms", "-d", str(body)]
    for header in GRPC_HEADERS:
        argv += ["-H", header]
    before_calls, before = handled(server, method), {name: read() for name, read in meters.items()}
    children, t0 = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    done = subprocess.run([*argv, url], capture_output=True, text=True, timeout=duration + warmup + 60)
    after, wall = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter() - t0
    deltas = {name: read() - before[name] for name, read in meters.items()}
    after_calls = handled(server, method)
    if done.returncode != 0:
        raise RuntimeError(f"h2load exited {done.returncode}: {done.stderr[-2000:] or done.stdout[-2000:]}")
    codes = {code: after_calls.get(code, 0.0) - before_calls.get(code, 0.0) for code in after_calls}
    calls = sum(codes.values())
    return {**parse_report(done.stdout), "calls": int(calls), "errors": int(calls - codes.get("OK", 0.0)),
            "codes": {code: int(n) for code, n in codes.items() if n},
            "wall_s": wall, "client_cpu_s": (after.ru_utime + after.ru_stime) - (children.ru_utime + children.ru_stime),
            **deltas}
