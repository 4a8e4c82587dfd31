"""``--ready-file`` and the harness over it (server/launcher.py), against real server processes."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cifar10_serving.server.config import parse_config
from cifar10_serving.server.launcher import ServerProcess, ServerStartError
from tests.helpers.servers import server_args
from cifar10_serving.server.ready_file import read_ready_file, write_ready_file

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
SLOW_WARMUP = "10"  # warm-up rounds: long enough (most of a second at least) to see the port NOT_SERVING first


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _health(target: str, channel: grpc.Channel | None = None) -> int | None:
    """The health status, or None while the port does not answer yet."""
    if channel is None:
        with grpc.insecure_channel(target) as channel:
            return _health(target, channel)
    try:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2).status
    except grpc.RpcError:
        return None


@pytest.mark.system
def test_the_ready_file_appears_only_once_serving_and_tells_the_truth(tiny_models_dir):
    port = _free_port()  # known in advance, so the port can be watched before the file exists
    server = ServerProcess(server_args(tiny_models_dir, port=port, warmup_batches=SLOW_WARMUP), wait=False)
    # One channel, polled fast; short reconnect backoff, so it connects soon after the port is bound.
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=[
        ("grpc.initial_reconnect_backoff_ms", 50), ("grpc.min_reconnect_backoff_ms", 50),
        ("grpc.max_reconnect_backoff_ms", 100)])
    try:
        seen = []
        while True:
            existed = server.ready_path.exists()  # looked at before asking: NOT_SERVING after means it was absent
            status = _health(f"127.0.0.1:{port}", channel)
            seen.append(status)
            if status == NOT_SERVING:
                assert not existed, "the ready file existed while the server was NOT_SERVING"
            if existed:
                assert status == SERVING
                break
            assert server.alive, server.log
            time.sleep(0.01)
        assert NOT_SERVING in seen, seen  # the port was watched during warm-up, not only after it
        ready = server.wait_ready(10)
        assert ready == json.loads(server.ready_path.read_text())
        assert ready["pid"] == server.pid and server.port == port and server.target == f"127.0.0.1:{port}"
        assert ready["models"] == ["tiny-avg", "tiny-max"] and ready["device"] == "cpu"
        assert ready["default_model"] == "tiny-max" and ready["worker_index"] == -1
        assert len(server.metrics_ports) == 1 and server.metrics_ports[0] not in (0, port)
        body = urllib.request.urlopen(server.metrics_url(0), timeout=10).read().decode()
        assert "cifar10_model_info" in body and 'model="tiny-max"' in body
        assert "serving tiny-max:test" in server.log and "all models ready: tiny-avg:test, tiny-max:test" in server.log

        server.send_signal(signal.SIGTERM)
        assert server.wait(30) == 0
        assert not server.ready_path.exists()  # removed when draining began: a stale file never claims SERVING
    finally:
        channel.close()
        server.kill()
    assert not server.ready_path.parent.exists()  # the harness cleans up after itself


@pytest.mark.system
def test_the_harness_stops_with_sigterm_and_is_a_context_manager(tiny_models_dir):
    with ServerProcess(server_args(tiny_models_dir, metrics_port=-1, grace_period_seconds=2)) as server:
        assert _health(server.target) == SERVING
        assert server.metrics_ports == []  # metrics off
        assert server.stop() == 0
        assert "stopped" in server.log
    assert not server.alive


@pytest.mark.system
def test_a_server_that_cannot_start_fails_with_its_log(tmp_path):
    with pytest.raises(ServerStartError, match="(?s)exited with status 1 .*cannot start: models directory"):
        ServerProcess(["--models-dir", str(tmp_path / "missing")], start_timeout=120)


def test_ready_file_is_a_setting_like_the_others():
    assert parse_config([], {}).ready_file == ""
    assert parse_config([], {"CIFAR10_READY_FILE": "/run/r.json"}).ready_file == "/run/r.json"
    assert parse_config(["--ready-file", "a.json"], {"CIFAR10_READY_FILE": "b.json"}).ready_file == "a.json"


def test_the_ready_file_is_written_whole_and_replaced_atomically(tmp_path):
    path = tmp_path / "ready.json"
    assert read_ready_file(path) is None
    write_ready_file(path, {"port": 1})
    write_ready_file(path, {"port": 2})
    assert read_ready_file(path) == {"port": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["ready.json"]  # no temporary file left behind


def test_the_harness_imports_neither_torch_nor_grpc():
    code = ("import sys, cifar10_serving.server.launcher; "
            "print(sorted(m for m in ('torch', 'grpc') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
