"""Start-up: from exec to SERVING, and to every bundled model ready; and what the first callers pay.

    python -m bench.startup [--runs 5] [--calls 200]

Each run starts ``python -m cifar10_serving.server`` with default flags and the bundled models, and
reads its ready file every 10 ms: the first document is written at SERVING (the default model
answers), the second once every model serves (``all_ready``). Right after SERVING one caller sends
``--calls`` single-image Classify calls (PNG, the default model) one after another; after
``--settle`` seconds, when the background warm-up is done, the same again: the p99 of the first
batch against the second. Prints one line per run and the median and worst of each figure.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time

import grpc

from bench.inputs import make_requests
from bench.load import latency_ms
from bench.servers import echo_problems, server_args
from cifar10_serving.protos.cifar10.v1 import classifier_pb2_grpc as pb_grpc
from cifar10_serving.server.launcher import ServerProcess
from cifar10_serving.server.ready_file import read_ready_file


def calls(target: str, n: int) -> list[float]:
    request = make_requests("png", 1, "")[0]
    seconds = []
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.ClassifierStub(channel)
        for _ in range(n):
            start = time.perf_counter()
            stub.Classify(request, timeout=30)
            seconds.append(time.perf_counter() - start)
    return seconds


def one_run(n_calls: int, settle: float) -> dict[str, float]:
    start = time.monotonic()
    server = ServerProcess(server_args(), wait=False, on_line=echo_problems)
    try:
        serving = everything = None
        first: list[float] = []
        caller = threading.Thread(target=lambda: first.extend(calls(server.target, n_calls)))
        while everything is None:
            document = read_ready_file(server.ready_path)
            now = time.monotonic() - start
            if document is not None and serving is None:
                serving = now
                server.ready = document
                caller.start()  # the first callers, while the other models load
            if document is not None and document.get("all_ready"):
                everything = now
            if server.proc.poll() is not None:
                raise SystemExit(f"the server exited: {server.log[-2000:]}")
            time.sleep(0.01)
        caller.join()
        first = latency_ms(first)
        time.sleep(settle)
        steady = latency_ms(calls(server.target, n_calls))
    finally:
        server.stop()
    return {"serving_s": serving, "all_ready_s": everything, "first_p50_ms": first["p50_ms"],
            "first_p99_ms": first["p99_ms"], "steady_p50_ms": steady["p50_ms"], "steady_p99_ms": steady["p99_ms"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.startup", description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--calls", type=int, default=200, help="single-image calls right after SERVING, and later")
    parser.add_argument("--settle", type=float, default=30.0, help="seconds before the steady calls")
    args = parser.parse_args(argv)
    runs = []
    for i in range(args.runs):
        run = one_run(args.calls, args.settle)
        runs.append(run)
        print(f"run {i + 1}: " + ", ".join(f"{k} {v:.2f}" for k, v in run.items()), flush=True)
    for key in runs[0]:
        values = [r[key] for r in runs]
        print(f"{key}: median {statistics.median(values):.2f}, worst {max(values):.2f}")
    ratio = [r["first_p99_ms"] / r["steady_p99_ms"] for r in runs]
    print(f"first p99 / steady p99: median {statistics.median(ratio):.2f}, worst {max(ratio):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
