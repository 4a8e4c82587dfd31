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
from cifar10_serving.server.process import ServerProcess
from tests.support import random_images

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
    with ServerProcess(["--models-dir", str(models), "--default-model", "small-max", "--torch-threads", "1",
                        "--warmup-batches", "0", "--grace-period-seconds", "1"]) as process:
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
        # What this machine's own load costs a health check, so the bound below is the server's alone.
        idle = _quantile(_probe(health_pb2_grpc.HealthStub(channel), 1.0), 0.99)
    load = subprocess.Popen([sys.executable, "-m", "tests.feature_load", server.target, str(LOAD_SECONDS),
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
    # The p99. The server's own stall (every answer serialised and copied on the loop) put p90
    # at 0.5 s; with the answers built on threads, what was left was the loop waiting for a core behind
    # the compute: p99 92-154 ms at --compute-nice 0, 57-86 ms at the default 10 (README, Reliability).
    assert p99 < 0.1 + idle, f"health p99 {1e3 * p99:.0f} ms over {len(checks)} checks ({1e3 * idle:.0f} ms without the load)"
    assert max(plain) < 2.0, f"a plain call took {max(plain):.2f} s"
