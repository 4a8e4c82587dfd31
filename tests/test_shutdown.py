"""SIGTERM while callers are sending, to a real ``python -m cifar10_serving.server`` process: every request is
answered correctly or rejected with UNAVAILABLE (lost = 0), a request computing when the signal
comes completes, health turns NOT_SERVING, and the process exits within its grace period.

The callers are plain stubs without retries, so the test also holds the server to its answer to
grpc/grpc#41785 (a call gRPC has but no handler yet is CANCELLED when a grpc.aio server stops): no
call may end CANCELLED (server/connections.py says how)."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cifar10_serving.protos.cifar10.v1 import classifier_pb2 as pb
from cifar10_serving.protos.cifar10.v1 import classifier_pb2_grpc as pb_grpc
from cifar10_serving.server.launcher import ServerProcess
from tests.helpers.faulty_model import SLOW, export_faulty, marked
from tests.helpers.images import random_images
from tests.helpers.models import export_tiny
from tests.helpers.servers import RunningServer, make_config, server_args

pytestmark = pytest.mark.system  # SIGTERM to a real server process under load

GRACE = 20.0
RETRYABLE = {grpc.StatusCode.UNAVAILABLE}
UNARY_CALLERS, STREAM_CALLERS, BATCH = 6, 2, 8
SLOW_UNITS = 50  # ~2 s of work on a 2-core CPU shared with a training job; 0.3 s or more anywhere


def start_server(models_dir: Path) -> ServerProcess:
    return ServerProcess(server_args(models_dir, grace_period_seconds=GRACE, max_batch_size=16, max_queue_images=4096),
                         start_timeout=120)


@dataclass
class Tally:
    """What every caller saw; sent = ok + retryable + the rest, and the rest must be empty."""

    sent: int = 0
    ok: int = 0
    retryable: int = 0
    wrong_answers: int = 0
    other: Counter = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, **counts) -> None:
        with self.lock:
            for key, value in counts.items():
                setattr(self, key, getattr(self, key) + value)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    directory = tmp_path_factory.mktemp("shutdown-models")
    export_tiny(directory, "tiny-max")
    export_faulty(directory, "faulty")
    return directory


def test_sigterm_under_load_loses_nothing(models):
    direct = torch.jit.load(str(models / "tiny-max.pt"), map_location="cpu").eval()
    images = random_images(64, seed=31)
    with torch.no_grad():
        expected = direct(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()).numpy()
    server = start_server(models)
    try:
        _run(server, images, expected)
    finally:
        server.kill()


PENDING_CALLERS = 8
LOOP_BLOCKED_SECONDS = 2.0  # long enough for every caller's call to reach gRPC and wait there


def test_calls_waiting_in_grpc_for_a_handler_when_the_server_stops_end_unavailable(models):
    """The race of grpc/grpc#41785 made certain: the server's event loop is held while calls arrive, so
    they wait inside gRPC with no handler, and the stop is the first thing the loop does after. A
    plain grpc.aio stop fails every one of them CANCELLED."""
    server = RunningServer(make_config(models, grace_period_seconds=5.0))
    channels = [grpc.insecure_channel(server.target) for _ in range(PENDING_CALLERS)]
    try:
        for channel in channels:  # connected before the loop is held: a connection is gRPC's, not the loop's
            pb_grpc.ClassifierStub(channel).ListModels(pb.ListModelsRequest(), timeout=30)
        codes: Counter = Counter()
        lock = threading.Lock()

        def call(channel: grpc.Channel) -> None:
            try:
                pb_grpc.ClassifierStub(channel).ListModels(pb.ListModelsRequest(), timeout=30)
                code = grpc.StatusCode.OK
            except grpc.RpcError as exc:
                code = exc.code()
            with lock:
                codes[code.name] += 1

        server.loop.call_soon_threadsafe(time.sleep, LOOP_BLOCKED_SECONDS)
        stopping = asyncio.run_coroutine_threadsafe(server.app.stop(), server.loop)  # runs once the loop is free
        callers = [threading.Thread(target=call, args=(channel,)) for channel in channels]
        for caller in callers:
            caller.start()
        stopping.result(60)
        for caller in callers:
            caller.join(60)
        assert sum(codes.values()) == PENDING_CALLERS and set(codes) <= {"OK", "UNAVAILABLE"}, codes
    finally:
        for channel in channels:
            channel.close()
        server.loop.call_soon_threadsafe(server.loop.stop)
        server.thread.join(10)


def _run(server: ServerProcess, images: np.ndarray, expected: np.ndarray) -> None:
    tally, stop, signalled = Tally(), threading.Event(), threading.Event()
    rng_lock = threading.Lock()
    rng = np.random.default_rng(32)

    def pick() -> list[int]:
        with rng_lock:
            return list(rng.integers(0, len(images), BATCH))

    def request(index: list[int]) -> pb.ClassifyRequest:
        return pb.ClassifyRequest(images=[pb.Image(raw=pb.RawTensor(
            shape=[32, 32, 3], layout=pb.LAYOUT_HWC, data=images[i].tobytes())) for i in index])

    def check(index: list[int], response: pb.ClassifyResponse) -> None:
        got = np.array([r.probabilities for r in response.results], dtype=np.float32)
        right = got.shape == (len(index), 10) and np.allclose(got, expected[index], atol=1e-5)
        tally.add(ok=int(right), wrong_answers=int(not right))

    def unary_caller() -> None:
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.ClassifierStub(channel)
            while not stop.is_set():
                index = pick()
                tally.add(sent=1)
                try:
                    check(index, stub.Classify(request(index), timeout=60))
                except grpc.RpcError as exc:
                    if exc.code() in RETRYABLE:
                        tally.add(retryable=1)
                        if not server.alive:
                            return  # the server is gone: a real client would now go elsewhere
                        time.sleep(0.01)  # back off, as a client should
                    else:
                        tally.other[exc.code().name] += 1

    def stream_caller() -> None:
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.ClassifierStub(channel)
            while not stop.is_set():
                sent: dict[str, list[int]] = {}
                closed, lock = [], threading.Lock()  # once the call is over, nothing more counts as sent

                def requests():
                    n = 0
                    while not stop.is_set():
                        index = pick()
                        with lock:
                            if closed:
                                return
                            sent[str(n)] = index
                        message = request(index)
                        message.request_id = str(n)
                        n += 1
                        yield message
                        time.sleep(0.005)

                answered = set()
                try:
                    for response in stub.ClassifyStream(requests(), timeout=60):
                        answered.add(response.request_id)
                        if response.HasField("error"):
                            tally.other[f"stream error {response.error.code}"] += 1
                        else:
                            check(sent[response.request_id], response)
                    code = grpc.StatusCode.OK
                except grpc.RpcError as exc:
                    code = exc.code()
                with lock:
                    closed.append(True)
                    tally.add(sent=len(sent))
                    unanswered = len(sent) - len(answered)
                if code in RETRYABLE:
                    tally.add(retryable=unanswered)  # the stream's status tells the client to resend these
                    if not server.alive:
                        return
                    time.sleep(0.01)
                elif unanswered:
                    tally.other[f"stream ended {code.name} with {unanswered} unanswered"] += 1

    health_seen: list[int] = []

    def watch_health() -> None:
        with grpc.insecure_channel(server.target) as channel:
            try:
                for update in health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=120):
                    health_seen.append(update.status)
            except grpc.RpcError:
                pass

    slow_result: dict[str, object] = {}

    def slow_caller() -> None:
        with grpc.insecure_channel(server.target) as channel:
            image = marked(images[0], SLOW + (SLOW_UNITS,))
            message = pb.ClassifyRequest(model="faulty", images=[pb.Image(raw=pb.RawTensor(
                shape=[32, 32, 3], layout=pb.LAYOUT_HWC, data=image.tobytes()))])
            try:
                slow_result["response"] = pb_grpc.ClassifierStub(channel).Classify(message, timeout=120)
            except grpc.RpcError as exc:
                slow_result["error"] = exc.code()
            slow_result["done"] = time.monotonic()

    watcher = threading.Thread(target=watch_health)
    watcher.start()
    callers = [threading.Thread(target=unary_caller) for _ in range(UNARY_CALLERS)]
    callers += [threading.Thread(target=stream_caller) for _ in range(STREAM_CALLERS)]
    for caller in callers:
        caller.start()
    deadline = time.monotonic() + 60
    while tally.ok < 100:  # load is flowing
        assert time.monotonic() < deadline, "no load"
        time.sleep(0.01)
    slow = threading.Thread(target=slow_caller)
    slow.start()
    while server.metric_sum("cifar10_queue_wait_seconds_count", model="faulty") < 1:  # its forward pass began
        assert time.monotonic() < deadline
        time.sleep(0.005)
    sigterm = time.monotonic()
    signalled.set()
    server.send_signal(signal.SIGTERM)
    try:
        server.wait(GRACE + 10)
    except subprocess.TimeoutExpired:
        pytest.fail(f"no exit {GRACE + 10:.0f}s after SIGTERM; the server's log:\n{server.log}")
    exit_seconds = time.monotonic() - sigterm
    stop.set()
    for thread in (*callers, slow, watcher):
        thread.join(60)
        assert not thread.is_alive()

    log = server.log
    assert server.returncode == 0, log
    assert exit_seconds < GRACE, f"exit took {exit_seconds:.1f}s; the server's log:\n{log}"
    # the request computing when the signal came was answered, correctly
    assert "response" in slow_result and slow_result["done"] > sigterm, f"{slow_result}; the server's log:\n{log}"
    assert len(slow_result["response"].results) == 1
    # lost = 0: no call was cut off in a handler (the exit came well within the grace period, and the
    # slow call above completed), and everything sent was answered right or refused with a code that says "retry"
    assert tally.wrong_answers == 0 and not tally.other, (tally, log)
    assert tally.sent == tally.ok + tally.retryable, tally
    assert tally.ok > 100 and tally.retryable > 0, tally  # load ran on both sides of the signal
    serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    assert health_seen[:1] == [serving] and not_serving in health_seen, health_seen
    assert "stopping: draining" in log and "stopped" in log
