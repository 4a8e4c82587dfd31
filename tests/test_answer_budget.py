"""The answer budget, against a real server process: answers nobody reads (a raw HTTP/2 client that
grants no flow-control window) are refused once the budget is reached, the server's memory stays
bounded, other calls go on, and the budget comes back when the connections close."""

from __future__ import annotations

import time
import urllib.parse

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cifar10_serving.protos.cifar10.v1 import classifier_pb2 as pb
from cifar10_serving.protos.cifar10.v1 import classifier_pb2_grpc as pb_grpc
from cifar10_serving.server.launcher import ServerProcess
from tests.helpers.images import encode, random_images
from tests.helpers.memory import budget_in_use, rss, wait_for_budget_back
from tests.helpers.rawh2 import WithholdingClient
from tests.helpers.servers import server_args

pytestmark = pytest.mark.system  # a server process, its memory read from /proc

MiB = 1 << 20
BUDGET = 16 * MiB  # three quarters (12 MiB) for feature maps: one 32-image "*" answer of the tiny model
RESOURCE_EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
CLASSIFY = "/cifar10.v1.Classifier/Classify"
STREAM = "/cifar10.v1.Classifier/ClassifyStream"
# 32 small PNGs asking for every layer: ~2.2 MB of answer (held three times over) from ~100 KB of request
EVERY_MAP = pb.ClassifyRequest(images=[pb.Image(encoded=encode(a)) for a in random_images(32, seed=5)],
                               feature_layers=["*"]).SerializeToString()
BIG_ANSWERS = [("grpc.max_receive_message_length", -1)]
PLAIN = pb.ClassifyRequest(images=[pb.Image(encoded=encode(random_images(1, seed=6)[0], "JPEG"))])


@pytest.fixture(scope="module")
def server(tiny_models_dir):
    with ServerProcess(server_args(tiny_models_dir, answer_budget_bytes=BUDGET)) as process:
        yield process



def _others_are_served(server) -> None:
    with grpc.insecure_channel(server.target) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        assert len(pb_grpc.ClassifierStub(channel).Classify(PLAIN, timeout=10).results) == 1




def test_unread_answers_are_refused_once_the_budget_is_full_and_memory_stays_bounded(server):
    _others_are_served(server)
    before = rss(server.pid)
    clients = [WithholdingClient("127.0.0.1", server.port) for _ in range(10)]
    try:
        streams = []
        for client in clients:  # 40 requests, four per connection, as the attack did
            streams += [(client, client.call(CLASSIFY, EVERY_MAP)) for _ in range(4)]
            client.pump(0.05)
        until = time.monotonic() + 20
        while time.monotonic() < until:
            for client in clients:
                client.pump(0.02)
            if sum(1 for c, s in streams if s in c.statuses) >= len(streams) - 6:
                break
        refused = [c.statuses[s] for c, s in streams if s in c.statuses]
        # The budget holds one such answer (two at most, as they come and go); every other is refused at once.
        assert len(refused) >= len(streams) - 6, refused
        assert all(code == RESOURCE_EXHAUSTED for code, _ in refused), refused
        message = urllib.parse.unquote(refused[0][1])
        assert "fewer feature_layers" in message and "FLOAT16" in message, message
        grown = rss(server.pid) - before
        # Unbounded, 40 unsent answers of ~2.2 MB, each held three times over, grew it by ~260 MB.
        assert grown < BUDGET + 64 * MiB, f"resident memory grew {grown / MiB:.0f} MiB"
        assert 0 < budget_in_use(server) <= BUDGET
        assert server.metric_sum("cifar10_answer_budget_refusals_total") >= len(refused)
        _others_are_served(server)  # plain calls keep a quarter of the budget and half the queue
    finally:
        for client in clients:
            client.close()
    wait_for_budget_back(server)  # the calls end with their connections, and give their bytes back
    with grpc.insecure_channel(server.target, options=BIG_ANSWERS) as channel:
        response = pb_grpc.ClassifierStub(channel).Classify(pb.ClassifyRequest.FromString(EVERY_MAP), timeout=30)
        assert len(response.results) == 32 and len(response.results[0].feature_maps) > 20


def test_an_unread_stream_is_bounded_by_the_same_budget(server):
    before_refusals = server.metric_sum("cifar10_answer_budget_refusals_total")
    before = rss(server.pid)
    client = WithholdingClient("127.0.0.1", server.port)
    try:
        stream = client.call(STREAM)
        for _ in range(30):  # in-stream refusals are DATA too: this client never sees them, the metric does
            client.send(stream, EVERY_MAP)
            client.pump(0.02)
        until = time.monotonic() + 20
        while server.metric_sum("cifar10_answer_budget_refusals_total") - before_refusals < 24:
            assert time.monotonic() < until, "the stream's requests were not refused"
            client.pump(0.1)
        assert rss(server.pid) - before < BUDGET + 64 * MiB
        assert budget_in_use(server) <= BUDGET
        _others_are_served(server)
    finally:
        client.close()
    wait_for_budget_back(server)


def test_an_answer_larger_than_the_budget_is_refused_with_advice_that_works(server):
    request = pb.ClassifyRequest.FromString(EVERY_MAP)
    request.images.extend(list(request.images))  # 64 images: more than the budget holds for one answer
    with grpc.insecure_channel(server.target, options=BIG_ANSWERS) as channel:
        stub = pb_grpc.ClassifierStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.Classify(request, timeout=30)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "more than the" in info.value.details() and "fewer feature_layers" in info.value.details()
        del request.feature_layers[:]
        request.feature_layers.append("stage3.pool")
        assert len(stub.Classify(request, timeout=30).results[0].feature_maps) == 1
    wait_for_budget_back(server)
