"""The event loop under heavy answers, against a real server process running the shipped small-max
model: while 32 callers (in their own process) ask for every feature map, health checks stay fast
and a plain call is neither slow nor refused."""

from __future__ import annotations

import concurrent.futures
import json
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cifar10_serving.protos.cifar10.v1 import classifier_pb2 as pb
from cifar10_serving.protos.cifar10.v1 import classifier_pb2_grpc as pb_grpc
from cifar10_serving.server.launcher import ServerProcess
from tests.helpers.images import random_images
from tests.helpers.servers import server_args

pytestmark = pytest.mark.system  # a server process under load from another process

SHIPPED = Path(__file__).resolve().parent.parent / "model" / "artifacts"
CALLERS = 32
IMAGES = 64  # a full batch each: every map of small-max is ~35 MB of answer (the tiny model's, ~4 MB, hid the stall)
MIN_ANSWERS = 8  # ~280 MB answered in LOAD_SECONDS: the probe ran while answers were built and sent
PROBE_SECONDS = 10.0  # ~450 checks: a p99 of the slowest few, not of the slowest one or two
LOAD_SECONDS = 1.5 + PROBE_SECONDS + 0.5
PLAIN = pb.ClassifyRequest(images=[pb.Image(raw=pb.RawTensor(shape=[32, 32, 3], layout=pb.LAYOUT_HWC,
                                                             data=random_images(1, seed=4)[0].tobytes()))])


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    models = tmp_path_factory.mktemp("small-max")
    (models / "small-max.pt").symlink_to(SHIPPED / "small-max.pt")  # only this one: loading is most of the start
    # No warm-up: the load's first seconds, before the probe, do it.
    with ServerProcess(server_args(models, default_model="small-max", warmup_batches=0)) as process:
        yield process


def _quantile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def _probe(health, seconds: float) -> list[float]:
    checks = []
    until = time.monotonic() + seconds
    while time.monotonic() < until:
        start = time.perf_counter()
        health.Check(health_pb2.HealthCheckRequest(), timeout=5)
        checks.append(time.perf_counter() - start)
        time.sleep(0.01)
    return checks


def _checks_and_plain_calls(channel, health) -> tuple[list[float], list[float]]:
    """Health checks, and plain calls on a thread of their own meanwhile, so that health is checked
    all the while: a quantile of a hundred checks or more, not of the few between plain calls."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        plain = pool.submit(_plain_calls, pb_grpc.ClassifierStub(channel), PROBE_SECONDS)
        checks = _probe(health, PROBE_SECONDS)
        return checks, plain.result()  # RESOURCE_EXHAUSTED there fails the test


def _plain_calls(stub, seconds: float) -> list[float]:
    took = []
    until = time.monotonic() + seconds
    while time.monotonic() < until:
        start = time.perf_counter()
        stub.Classify(PLAIN, timeout=5)
        took.append(time.perf_counter() - start)
        time.sleep(0.1)
    return took


def test_health_stays_fast_and_plain_calls_are_served_under_every_feature_map_load(server):
    with grpc.insecure_channel(server.target) as channel:
        # What this machine's own load costs a health check, so the bounds below are the server's alone;
        # after one check, so that connecting is not in it.
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        idle = _quantile(_probe(health_pb2_grpc.HealthStub(channel), 1.0), 0.99)
    load = subprocess.Popen([sys.executable, "-m", "tests.helpers.feature_load", server.target, str(LOAD_SECONDS),
                             str(CALLERS), str(IMAGES)], stdout=subprocess.PIPE, text=True)
    try:
        with grpc.insecure_channel(server.target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            health.Check(health_pb2.HealthCheckRequest(), timeout=5)
            time.sleep(1.5)  # the callers connect and fill the queue
            checks, plain = _checks_and_plain_calls(channel, health)
        out, _ = load.communicate(timeout=LOAD_SECONDS + 30)
    finally:
        if load.poll() is None:
            load.kill()
            load.wait()
    codes = json.loads(out.strip().splitlines()[-1])
    assert codes.get("OK", 0) >= MIN_ANSWERS, codes  # the load was real
    assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED"}, codes
    p50, p90, p99 = _quantile(checks, 0.5), _quantile(checks, 0.9), _quantile(checks, 0.99)
    print(f"health p50 {1e3 * p50:.0f} ms, p90 {1e3 * p90:.0f} ms, p99 {1e3 * p99:.0f} ms (idle p99 {1e3 * idle:.0f} ms) over {len(checks)} checks; "
          f"plain max {1e3 * max(plain):.0f} ms over {len(plain)}; load {codes}")
    # The stall this guards against (every answer serialised and copied on the loop) put p90 at 0.5 s.
    # With the answers built on threads what is left is the loop waiting for a core and gRPC's copy of
    # each 35 MB answer: p90 21-36 ms and p99 64-99 ms on the 2-core VM, p90 27 ms and p99 131 ms on a
    # CI machine of the same kind (README, Reliability). The p99 of a few hundred checks on two cores
    # shared with the callers is a figure to print, not a bound to assert within 30% of it.
    assert p90 < 0.1 + idle, f"health p90 {1e3 * p90:.0f} ms over {len(checks)} checks ({1e3 * idle:.0f} ms without the load)"
    assert p99 < 0.25 + idle, f"health p99 {1e3 * p99:.0f} ms over {len(checks)} checks ({1e3 * idle:.0f} ms without the load)"
    assert max(plain) < 2.0, f"a plain call took {max(plain):.2f} s"


def test_the_heap_left_by_start_up_is_out_of_the_collectors_reach():
    """server.main.settle_heap, run when start-up is done: a full collection afterwards no longer scans
    what torch, the protos and the server left (75-115 ms with the loop stopped, before it)."""
    script = """
import gc, json, time
import torch
from cifar10_serving.server import main
def full():
    start = time.perf_counter(); gc.collect(); return time.perf_counter() - start
before = min(full() for _ in range(3))
frozen = main.settle_heap()
print(json.dumps({"before": before, "after": min(full() for _ in range(3)), "frozen": frozen}))
"""
    out = json.loads(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                                    timeout=120).stdout.strip().splitlines()[-1])
    assert out["frozen"] > 100_000, out
    assert out["after"] < out["before"] / 5, out
