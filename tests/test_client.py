"""The client library's retries, against a real gRPC server on loopback whose Classify fails on
purpose with the status under test before it answers."""

from __future__ import annotations

from concurrent import futures

import grpc
import numpy as np
import pytest

from cifar10_serving.client import ClassifierClient, ClassifierError
from cifar10_serving.protos.cifar10.v1 import classifier_pb2 as pb
from cifar10_serving.protos.cifar10.v1 import classifier_pb2_grpc as pb_grpc


class Failing(pb_grpc.ClassifierServicer):
    """Answers the n-th Classify with ``script[n]`` (a status code to fail with) or, past the script, a result."""

    def __init__(self, script: list[grpc.StatusCode]) -> None:
        self.script, self.calls = script, 0

    def Classify(self, request, context):
        self.calls += 1
        if self.calls <= len(self.script):
            context.abort(self.script[self.calls - 1], "failing on purpose")
        scores = [0.0] * 10
        scores[3] = 1.0
        return pb.ClassifyResponse(results=[pb.Result(probabilities=scores, top_k=[pb.Prediction(label="cat", index=3,
                                                                                                probability=1.0)])])


@pytest.fixture
def serve():
    servers = []

    def start(script):
        servicer = Failing(script)
        server = grpc.server(futures.ThreadPoolExecutor(2))
        pb_grpc.add_ClassifierServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        servers.append(server)
        return servicer, f"127.0.0.1:{port}"

    start.servers = servers
    yield start
    for server in servers:
        server.stop(None)


IMAGES = [np.zeros((32, 32, 3), dtype=np.uint8)]


@pytest.mark.parametrize("code", [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED])
def test_a_call_the_server_did_not_run_is_sent_again(serve, code):
    servicer, target = serve([code, code])
    with ClassifierClient(target, timeout=10) as client:
        assert client.classify(IMAGES)[0].label == "cat"
    assert servicer.calls == 3  # two failures, then the answer: the default of 3 attempts


def test_attempts_bound_the_retries_and_one_means_none(serve):
    servicer, target = serve([grpc.StatusCode.UNAVAILABLE] * 3)
    with ClassifierClient(target, timeout=10, attempts=2) as client, pytest.raises(ClassifierError) as info:
        client.classify(IMAGES)
    assert info.value.code == grpc.StatusCode.UNAVAILABLE and servicer.calls == 2
    servicer.calls = 0
    with ClassifierClient(target, timeout=10, attempts=1) as client, pytest.raises(ClassifierError):
        client.classify(IMAGES)
    assert servicer.calls == 1
    with pytest.raises(ValueError, match="attempts"):
        ClassifierClient(target, attempts=0)


def test_other_failures_are_not_retried(serve):
    servicer, target = serve([grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INVALID_ARGUMENT])
    with ClassifierClient(target, timeout=10) as client:
        for expected in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INVALID_ARGUMENT):
            with pytest.raises(ClassifierError) as info:
                client.classify(IMAGES)
            assert info.value.code == expected
    assert servicer.calls == 2  # each sent once


# ----------------------------------------------------------------------------- several replicas
def test_a_list_of_replicas_is_balanced_call_by_call_and_a_stopped_one_is_skipped(serve):
    (first, a), (second, b) = serve([]), serve([])
    with ClassifierClient([a, b], timeout=10) as client:
        assert client.target == f"ipv4:{a},{b}"
        for _ in range(20):
            assert client.classify(IMAGES)[0].label == "cat"
        # round_robin takes the replicas in turn once both are connected; the first calls may find one still connecting
        assert first.calls + second.calls == 20 and min(first.calls, second.calls) >= 8
        servers = serve.servers
        servers[0].stop(None)
        before = second.calls
        for _ in range(10):  # a call that meets the stopped replica fails UNAVAILABLE and is resent to the other
            assert client.classify(IMAGES)[0].label == "cat"
        assert second.calls - before == 10


def test_an_address_list_target_gets_round_robin_and_a_single_address_gets_grpcs_default(serve):
    (first, a), (second, b) = serve([]), serve([])
    with ClassifierClient(f"ipv4:{a},{b}", timeout=10) as client:
        for _ in range(10):
            client.classify(IMAGES)
    assert first.calls > 0 and second.calls > 0
    first.calls = second.calls = 0
    with ClassifierClient(f"ipv4:{a},{b}", timeout=10, load_balancing="pick_first") as client:
        for _ in range(10):
            client.classify(IMAGES)
    assert sorted((first.calls, second.calls)) == [0, 10]  # one connection, to one replica


@pytest.mark.parametrize("addresses, target", [
    (["127.0.0.1:1", "127.0.0.2:2"], "ipv4:127.0.0.1:1,127.0.0.2:2"),
    (["[::1]:1", "[::1]:2"], "ipv6:[::1]:1,[::1]:2"),
])
def test_address_lists_become_one_target(addresses, target):
    from cifar10_serving.client._client import address_list_target

    assert address_list_target(addresses) == target


@pytest.mark.parametrize("addresses, message", [
    ([], "no addresses"),
    (["localhost:50051"], "not an IP address"),
    (["127.0.0.1"], "not an IP address"),
    (["::1:50051"], "not an IP address"),
    (["127.0.0.1:1", "[::1]:2"], "mix of IPv4 and IPv6"),
])
def test_bad_address_lists_are_refused_with_what_to_do(addresses, message):
    with pytest.raises(ValueError, match=message):
        ClassifierClient(addresses)


def test_an_unknown_balancing_policy_is_refused():
    with pytest.raises(ValueError, match="load_balancing"):
        ClassifierClient("127.0.0.1:1", load_balancing="least_request")
