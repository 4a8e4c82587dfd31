"""``--workers``: real ``python -m server`` processes sharing one port, driven over real connections."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from cifar10_serving.client import ClassifierClient
from cifar10_serving.server.config import ServerConfig
from tests.support import random_images

ROOT = Path(__file__).resolve().parent.parent
WORKERS = 2
CONNECTIONS = 16  # the kernel spreads connections at random: all 16 on one worker has odds of 2 in 65,536
GRACE = 5.0


class Supervisor:
    """``python -m server --workers 2`` on ephemeral ports, its log read on a thread."""

    def __init__(self, models_dir: Path) -> None:
        self.log: list[str] = []
        self.serving = threading.Semaphore(0)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cifar10_serving.server", "--workers", str(WORKERS), "--port", "0", "--metrics-port", "0",
             "--models-dir", str(models_dir), "--default-model", "tiny-max", "--warmup-batches", "1",
             "--grace-period-seconds", str(GRACE)],
            cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)})
        threading.Thread(target=self._read, daemon=True).start()
        for _ in range(WORKERS):
            if not self.serving.acquire(timeout=120):
                self.stop()
                raise RuntimeError("the workers did not start:\n" + "".join(self.log))
        lines = re.findall(r"serving .* on 127\.0\.0\.1:(\d+) \(metrics on (\d+).*worker (\d+)\)", "".join(self.log))
        self.ports = {int(port) for port, _, _ in lines}
        self.metrics_ports = [int(metrics) for _, metrics, _ in lines]
        self.indexes = sorted(int(index) for _, _, index in lines)
        self.target = f"127.0.0.1:{min(self.ports)}"

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.log.append(line)
            if " serving " in line:
                self.serving.release()

    def workers(self) -> list[int]:
        """The pids of the supervisor's children."""
        with open(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children") as f:
            return [int(pid) for pid in f.read().split()]

    def ok_calls(self, metrics_port: int) -> float:
        body = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
        return sum(float(v) for v in re.findall(r'^cifar10_requests_total\{[^}]*code="OK"[^}]*\} (\S+)$', body, re.M))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


@pytest.fixture()
def supervisor(models_dir):
    running = Supervisor(models_dir)
    yield running
    running.stop()


def test_workers_share_one_port_and_each_answers_calls(supervisor):
    assert len(supervisor.ports) == 1 and supervisor.indexes == [0, 1]
    images = random_images(CONNECTIONS, seed=5)
    with ClassifierClient(supervisor.target, connections=CONNECTIONS) as client:  # each call on the next connection
        for i in range(CONNECTIONS):
            assert len(client.classify([images[i]])) == 1
    per_worker = [supervisor.ok_calls(port) for port in supervisor.metrics_ports]
    assert sum(per_worker) == CONNECTIONS and all(n > 0 for n in per_worker), per_worker

    workers = supervisor.workers()
    supervisor.proc.send_signal(signal.SIGTERM)
    assert supervisor.proc.wait(GRACE + 30) == 0
    assert not any(_alive(pid) for pid in workers)


def test_a_worker_that_dies_stops_the_others_and_the_supervisor_fails(supervisor):
    first, second = supervisor.workers()
    os.kill(first, signal.SIGKILL)
    assert supervisor.proc.wait(GRACE + 30) == 1
    deadline = time.monotonic() + 10
    while _alive(second) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(second)
    assert "worker 0 exited" in "".join(supervisor.log) or "worker 1 exited" in "".join(supervisor.log)


def test_workers_and_connections_must_be_at_least_one():
    with pytest.raises(ValueError, match="workers must be at least 1, got 0"):
        ServerConfig(workers=0)
    with pytest.raises(ValueError, match="connections must be at least 1, got 0"):
        ClassifierClient(connections=0)
