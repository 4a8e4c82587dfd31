"""The process's life, on real ``python -m cifar10_serving.server`` processes: a signal during start-up
ends it cleanly, and the workers of ``--workers`` do not outlive a supervisor killed with SIGKILL."""

from __future__ import annotations

import os
import signal
import socket
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cifar10_serving.server.launcher import ServerProcess
from tests.helpers.servers import server_args

pytestmark = pytest.mark.system  # signals a real server process during start-up and kills its supervisor

GRACE = 3.0
LONG_WARMUP = 100_000  # rounds of warm-up: far longer than any test waits
EXIT_SECONDS = 20.0  # a signalled process must be gone by then: the grace, one warm-up round, interpreter exit


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _health(port: int, timeout: float = 2.0):
    """The health status on ``port``, or None when nothing answers."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout).status
        except grpc.RpcError:
            return None


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(child) for child in f.read().split()]


def _wait_until(condition, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"not within {seconds:.0f}s: {what}"
        time.sleep(0.1)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_during_warm_up_ends_the_process_cleanly(tiny_models_dir, sig):
    port = _free_port()
    server = ServerProcess(server_args(tiny_models_dir, port=port, grace_period_seconds=GRACE,
                                       warmup_batches=LONG_WARMUP), wait=False)
    try:
        # The port opens before warm-up: health answers NOT_SERVING until the models are warm.
        _wait_until(lambda: _health(port) == health_pb2.HealthCheckResponse.NOT_SERVING or not server.alive, 120,
                    "the port opened during warm-up")
        assert server.alive, server.log
        server.send_signal(sig)
        assert server.wait(EXIT_SECONDS) == 0, server.log
        assert f"received {sig.name}" in server.log and "stopped during start-up" in server.log, server.log
        assert not server.ready_path.exists() and not _listening(port)
    finally:
        server.kill()


def test_a_supervisor_killed_with_sigkill_takes_its_workers_along_and_can_be_restarted(tiny_models_dir):
    args = server_args(tiny_models_dir, workers=2, torch_threads=None, grace_period_seconds=GRACE)
    first = ServerProcess(args, start_timeout=120)
    try:
        port, workers = first.port, _children(first.pid)
        assert len(workers) == 2 and _health(port) == health_pb2.HealthCheckResponse.SERVING
        os.kill(first.pid, signal.SIGKILL)  # the supervisor only, as a crash or the OOM killer would
        _wait_until(lambda: not any(_alive(pid) for pid in workers), EXIT_SECONDS, "the workers exited")
        assert not _listening(port)
    finally:
        first.kill()
    second = ServerProcess([*args, "--port", str(port)], start_timeout=120)  # the same port, as a restart would
    try:
        assert second.port == port and _health(port) == health_pb2.HealthCheckResponse.SERVING
        assert second.stop(timeout=GRACE + 30) == 0
    finally:
        second.kill()
