"""The event loop under heavy answers, against a real server process: while 32 callers (in their
own process) ask for every feature map, health checks stay fast and a plain call is neither slow
nor refused."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cifar10_serving.protos.cifar10.v1 import classifier_pb2 as pb
from cifar10_serving.protos.cifar10.v1 import classifier_pb2_grpc as pb_grpc
from cifar10_serving.server.process import ServerProcess
from tests.support import random_images

CALLERS = 32
IMAGES = 64  # a full batch each: every map of the tiny model is ~4.3 MB of answer
LOAD_SECONDS = 8.0
PROBE_SECONDS = 5.0
PLAIN = pb.ClassifyRequest(images=[pb.Image(raw=pb.RawTensor(shape=[32, 32, 3], layout=pb.LAYOUT_HWC,
                                                             data=random_images(1, seed=4)[0].tobytes()))])


@pytest.fixture(scope="module")
def server(tiny_models_dir):
    with ServerProcess(["--models-dir", str(tiny_models_dir), "--default-model", "tiny-max", "--torch-threads", "1",
                        "--grace-period-seconds", "1"]) as process:
        yield process


def _p99(values: list[float]) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(0.99 * len(values)))]


def _probe(health, seconds: float) -> list[float]:
    checks = []
    until = time.monotonic() + seconds
    while time.monotonic() < until:
        start = time.perf_counter()
        health.Check(health_pb2.HealthCheckRequest(), timeout=5)
        checks.append(time.perf_counter() - start)
        time.sleep(0.01)
    return checks


def test_health_stays_fast_and_plain_calls_are_served_under_every_feature_map_load(server):
    with grpc.insecure_channel(server.target) as channel:
        # What this machine's own load costs a health check, so the bound below is the server's alone.
        idle = _p99(_probe(health_pb2_grpc.HealthStub(channel), 1.0))
    load = subprocess.Popen([sys.executable, "-m", "tests.feature_load", server.target, str(LOAD_SECONDS),
                             str(CALLERS), str(IMAGES)], stdout=subprocess.PIPE, text=True)
    try:
        with grpc.insecure_channel(server.target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            stub = pb_grpc.ClassifierStub(channel)
            health.Check(health_pb2.HealthCheckRequest(), timeout=5)
            time.sleep(1.5)  # the callers connect and fill the queue
            checks, plain = [], []
            until = time.monotonic() + PROBE_SECONDS
            while time.monotonic() < until:
                start = time.perf_counter()
                health.Check(health_pb2.HealthCheckRequest(), timeout=5)
                checks.append(time.perf_counter() - start)
                if len(checks) % 10 == 0:
                    start = time.perf_counter()
                    stub.Classify(PLAIN, timeout=5)  # RESOURCE_EXHAUSTED here would fail the test
                    plain.append(time.perf_counter() - start)
                time.sleep(0.01)
        out, _ = load.communicate(timeout=LOAD_SECONDS + 30)
    finally:
        if load.poll() is None:
            load.kill()
            load.wait()
    codes = json.loads(out.strip().splitlines()[-1])
    assert codes.get("OK", 0) >= CALLERS, codes  # the load was real: every caller got answers
    assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED"}, codes
    print(f"health p99 {1e3 * _p99(checks):.0f} ms (idle {1e3 * idle:.0f} ms), max {1e3 * max(checks):.0f} ms over {len(checks)} checks; "
          f"plain max {1e3 * max(plain):.0f} ms; load {codes}")
    assert _p99(checks) < 0.1 + idle, (f"health p99 {1e3 * _p99(checks):.0f} ms over {len(checks)} checks "
                                       f"({1e3 * idle:.0f} ms without the load)")
    assert max(plain) < 2.0, f"a plain call took {max(plain):.2f} s"
