"""``--workers``: every worker answers the statistics extension (gRPC ModelStatistics and HTTP
``/stats``) with the whole server's figures, its own plus its siblings', and ModelConfig with the whole
server's instances; driven over real connections, which the kernel spreads across the workers."""

from __future__ import annotations

import http.client
import json
import os
import signal
import time

import grpc
import pytest
from google.protobuf import json_format

from cifar10_serving.client import ClassifierClient
from cifar10_serving.protos.inference import open_inference_grpc_pb2 as v2
from cifar10_serving.protos.inference import open_inference_grpc_pb2_grpc as v2_grpc
from cifar10_serving.server.launcher import ServerProcess
from cifar10_serving.server.worker_statistics import TIMEOUT_SECONDS
from tests.helpers.images import random_images
from tests.helpers.servers import server_args

pytestmark = pytest.mark.system  # server processes

WORKERS = 2
CONNECTIONS = 16  # the kernel spreads connections at random: all 16 on one worker has odds of 2 in 65,536
MODEL = "tiny-max"


@pytest.fixture(scope="module")
def server(tiny_models_dir):
    """``--workers 2``, one model instance each, and K images classified over ``CONNECTIONS`` connections
    (1 to 3 images a call, so that images, calls and passes differ): (server, K, calls)."""
    with ServerProcess(server_args(tiny_models_dir, workers=WORKERS, torch_threads=None, instances=1),
                       start_timeout=120) as running:
        images = random_images(3, seed=11)
        sizes = [1 + i % 3 for i in range(CONNECTIONS)]
        with ClassifierClient(running.target, connections=CONNECTIONS) as client:  # each call on the next connection
            for n in sizes:
                assert len(client.classify(images[:n])) == n
        per_worker = [_calls(running, i, "Classify") for i in range(WORKERS)]
        assert sum(per_worker) == CONNECTIONS and all(n > 0 for n in per_worker), per_worker
        yield running, sum(sizes), len(sizes)


def _calls(server: ServerProcess, worker: int, method: str) -> float:
    """Calls of ``method`` that worker ``worker`` answered OK, from its own /metrics."""
    return sum(v for (name, labels), v in server.metrics(worker).items()
               if name == "cifar10_requests_total" and ("method", method) in labels and ("code", "OK") in labels)


def _channel(target: str) -> grpc.Channel:
    """A channel of its own connection (not shared through gRPC's global subchannel pool)."""
    return grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])


def _statistics(channel: grpc.Channel) -> v2.ModelStatistics:
    reply = v2_grpc.GRPCInferenceServiceStub(channel).ModelStatistics(v2.ModelStatisticsRequest(name=MODEL),
                                                                     timeout=10)
    assert len(reply.model_stats) == 1
    return reply.model_stats[0]


def _check_total(stats: v2.ModelStatistics, images: int, calls: int) -> None:
    assert stats.inference_count == images and stats.inference_stats.success.count == calls
    assert stats.inference_stats.fail.count == 0 and stats.inference_stats.queue.count == calls
    passes = [b.compute_infer.count for b in stats.batch_stats]
    assert sum(passes) == stats.execution_count > 0
    assert sum(b.batch_size * b.compute_infer.count for b in stats.batch_stats) == images  # no warm-up counted


def test_every_worker_answers_the_whole_servers_statistics(server):
    running, images, calls = server
    answers = []
    for _ in range(CONNECTIONS):  # a new connection each: every worker answers some
        with _channel(running.target) as channel:
            answers.append(_statistics(channel))
    per_worker = [_calls(running, i, "ModelStatistics") for i in range(WORKERS)]
    assert sum(per_worker) == CONNECTIONS and all(n > 0 for n in per_worker), per_worker
    for stats in answers:
        _check_total(stats, images, calls)
        assert stats == answers[0]  # no call in between: the same figures, whichever worker answered

    status, document = _http(running.http_port, f"/v2/models/{MODEL}/stats")
    assert status == 200
    assert json_format.ParseDict(document, v2.ModelStatisticsResponse()).model_stats == [answers[0]]


def test_model_config_counts_every_workers_instances(server):
    running, _, _ = server
    with _channel(running.target) as channel:
        config = v2_grpc.GRPCInferenceServiceStub(channel).ModelConfig(v2.ModelConfigRequest(name=MODEL),
                                                                      timeout=10).config
    assert [g.count for g in config.instance_group] == [WORKERS]  # --instances 1 in each worker
    status, document = _http(running.http_port, f"/v2/models/{MODEL}/config")
    assert status == 200 and [g["count"] for g in document["instance_group"]] == [WORKERS]


def test_a_sibling_that_cannot_say_fails_the_call_unavailable(server):
    """A stopped sibling: UNAVAILABLE naming it, within the timeout, rather than a partial sum; once it
    runs again, the same connection gets the whole server's figures."""
    running, images, calls = server
    pids = [w["pid"] for w in running.ready["workers"]]
    with _channel(running.target) as channel:
        before = [_calls(running, i, "ModelStatistics") for i in range(WORKERS)]
        _statistics(channel)  # which worker holds this connection: the one whose count went up
        after = [_calls(running, i, "ModelStatistics") for i in range(WORKERS)]
        ours = [i for i in range(WORKERS) if after[i] > before[i]]
        assert len(ours) == 1, (before, after)
        sibling = 1 - ours[0]
        os.kill(pids[sibling], signal.SIGSTOP)
        try:
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as refused:
                _statistics(channel)
            waited = time.monotonic() - started
        finally:
            os.kill(pids[sibling], signal.SIGCONT)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert f"worker {sibling} did not send its own" in refused.value.details()
        assert TIMEOUT_SECONDS <= waited < TIMEOUT_SECONDS + 3, waited
        _check_total(_statistics(channel), images, calls)


def _http(port: int, path: str) -> tuple[int, dict]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()
