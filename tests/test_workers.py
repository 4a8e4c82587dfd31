"""``--workers``: real ``python -m cifar10_serving.server`` processes sharing one port, driven over real connections."""

from __future__ import annotations

import os
import signal
import time
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cifar10_serving.client import ClassifierClient
from cifar10_serving.server.config import ServerConfig
from cifar10_serving.server.launcher import ServerProcess
from tests.helpers.images import random_images
from tests.helpers.servers import server_args

WORKERS = 2
CONNECTIONS = 16  # the kernel spreads connections at random: all 16 on one worker has odds of 2 in 65,536
GRACE = 5.0


def _children(pid: int) -> list[int]:
    """The pids of a process's children: the supervisor's workers."""
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(child) for child in f.read().split()]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def _ok_calls(server: ServerProcess, worker: int) -> float:
    return sum(v for (name, labels), v in server.metrics(worker).items()
               if name == "cifar10_requests_total" and ("code", "OK") in labels)


@pytest.fixture()
def supervisor(tiny_models_dir):
    """``--workers 2`` on ephemeral ports; ready once every worker is SERVING."""
    running = ServerProcess(server_args(tiny_models_dir, workers=WORKERS, torch_threads=None,
                                        grace_period_seconds=GRACE), start_timeout=120)
    yield running
    running.stop(timeout=GRACE + 30)


@pytest.mark.system
def test_workers_share_one_port_and_each_answers_calls(supervisor):
    workers = supervisor.ready["workers"]
    ports = {w["port"] for w in workers}  # each as the worker itself reported it
    assert len(ports) == 1 and sorted(w["worker_index"] for w in workers) == [0, 1]
    _check_ready_file(supervisor)
    images = random_images(CONNECTIONS, seed=5)
    with ClassifierClient(supervisor.target, connections=CONNECTIONS) as client:  # each call on the next connection
        for i in range(CONNECTIONS):
            assert len(client.classify([images[i]])) == 1
    per_worker = [_ok_calls(supervisor, i) for i in range(len(supervisor.metrics_ports))]
    assert sum(per_worker) == CONNECTIONS and all(n > 0 for n in per_worker), per_worker

    pids = _children(supervisor.pid)
    supervisor.send_signal(signal.SIGTERM)
    assert supervisor.wait(GRACE + 30) == 0
    assert not any(_alive(pid) for pid in pids)
    assert not supervisor.ready_path.exists()  # removed when stopping began


def _check_ready_file(supervisor: ServerProcess) -> None:
    """The supervisor's ready file, written once every worker is SERVING, lists every worker."""
    ready = supervisor.ready
    assert ready["pid"] == supervisor.pid and ready["port"] == supervisor.port
    assert sorted(w["pid"] for w in ready["workers"]) == sorted(_children(supervisor.pid))
    assert ready["models"] == ["tiny-avg", "tiny-max"] and ready["device"] == "cpu"
    assert len(set(supervisor.metrics_ports)) == WORKERS
    assert supervisor.metrics_ports == [p for w in ready["workers"] for p in w["metrics_ports"]]
    for i in range(WORKERS):  # each worker's own endpoint, already serving
        body = urllib.request.urlopen(supervisor.metrics_url(i), timeout=10).read().decode()
        assert "cifar10_model_info" in body
    for _ in range(4):  # new connections, spread across the workers: every one answers SERVING
        with grpc.insecure_channel(supervisor.target, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.system
def test_a_worker_that_dies_stops_the_others_and_the_supervisor_fails(supervisor):
    first, second = _children(supervisor.pid)
    os.kill(first, signal.SIGKILL)
    assert supervisor.wait(GRACE + 30) == 1
    deadline = time.monotonic() + 10
    while _alive(second) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(second)
    assert "worker 0 exited" in supervisor.log or "worker 1 exited" in supervisor.log


def test_workers_and_connections_must_be_at_least_one():
    with pytest.raises(ValueError, match="workers must be at least 1, got 0"):
        ServerConfig(workers=0)
    with pytest.raises(ValueError, match="connections must be at least 1, got 0"):
        ClassifierClient(connections=0)
