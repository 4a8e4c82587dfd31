"""Health Watch streams on a real ``python -m cifar10_serving.server`` process: one watcher leaving does
not orphan the others (issue 28, finding 7). In grpcio's asyncio servicer a Watch that ended deleted
its service's shared condition, so a load balancer already watching "" never heard NOT_SERVING at
SIGTERM, and its stream held the server until the grace ran out (10.9 s against 0.9 s)."""

from __future__ import annotations

import queue
import signal
import subprocess
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cifar10_serving.server.launcher import ServerProcess
from tests.helpers.servers import server_args

pytestmark = pytest.mark.system  # SIGTERM to a real server process

GRACE = 10.0
EXIT_SECONDS = 5.0  # well within the grace: nothing but the watches is open when SIGTERM comes
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
CANCEL_SECONDS = 1.0


class Watcher:
    """A Watch stream read on a thread: each status into ``seen``, then how the stream ended."""

    def __init__(self, target: str, service: str = "") -> None:
        self.channel = grpc.insecure_channel(target)
        self.call = health_pb2_grpc.HealthStub(self.channel).Watch(
            health_pb2.HealthCheckRequest(service=service), timeout=60)
        self.seen: queue.Queue[int] = queue.Queue()
        self.ended: str | None = None
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            for update in self.call:
                self.seen.put(update.status)
            self.ended = "OK"
        except grpc.RpcError as exc:
            self.ended = exc.code().name

    def next(self, timeout: float) -> int | None:
        try:
            return self.seen.get(timeout=timeout)
        except queue.Empty:
            return None

    def close(self) -> None:
        self.call.cancel()
        self.thread.join(10)
        self.channel.close()


def test_a_cancelled_watch_does_not_orphan_the_others(tiny_models_dir):
    server = ServerProcess(server_args(tiny_models_dir, grace_period_seconds=GRACE), start_timeout=120)
    watchers: list[Watcher] = []
    try:
        balancer = Watcher(server.target)  # watching before the outsider comes and goes
        watchers.append(balancer)
        assert balancer.next(10) == SERVING
        unknown = Watcher(server.target, "no.such.Service")
        watchers.append(unknown)
        assert unknown.next(10) == SERVICE_UNKNOWN

        outsider = Watcher(server.target)
        assert outsider.next(10) == SERVING
        outsider.close()
        # The server hears the cancellation (an RST_STREAM on a live connection) within milliseconds and
        # runs the Watch's cleanup; nothing it exports tells when (the interceptor counts no cancelled
        # stream), so the test gives it ample time.
        time.sleep(CANCEL_SECONDS)

        late = Watcher(server.target)  # and one that comes after it left
        watchers.append(late)
        assert late.next(10) == SERVING

        sigterm = time.monotonic()
        server.send_signal(signal.SIGTERM)
        for watcher in (balancer, late):
            assert watcher.next(EXIT_SECONDS) == NOT_SERVING, f"no NOT_SERVING; the server's log:\n{server.log}"
        try:
            server.wait(GRACE + 10)
        except subprocess.TimeoutExpired:
            pytest.fail(f"no exit {GRACE + 10:.0f}s after SIGTERM; the server's log:\n{server.log}")
        exit_seconds = time.monotonic() - sigterm
        assert server.returncode == 0, server.log
        assert exit_seconds < EXIT_SECONDS, f"exit took {exit_seconds:.1f}s; the server's log:\n{server.log}"
        for watcher in watchers:
            watcher.thread.join(10)
        # Every stream was ended by the server, each after its last status (none cut off at the grace).
        assert [w.ended for w in watchers] == ["OK"] * len(watchers)
        assert unknown.next(0) is None  # an unknown service stays SERVICE_UNKNOWN: its watch just ends
    finally:
        for watcher in watchers:
            watcher.close()
        server.kill()
