"""Hostile but well-formed traffic against a real server process (issue 28): every byte an answer
holds is in the answer budget (Explain answers, refusals inside streams, echoed ids), and refusals
quote caller data in bounded time and size, so a huge list neither stalls the event loop nor
turns the caller's INVALID_ARGUMENT into the transport's RESOURCE_EXHAUSTED."""

from __future__ import annotations

import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cifar10_serving.protos.cifar10.v1 import classifier_pb2 as pb
from cifar10_serving.protos.cifar10.v1 import classifier_pb2_grpc as pb_grpc
from cifar10_serving.protos.inference import open_inference_grpc_pb2 as v2
from cifar10_serving.protos.inference import open_inference_grpc_pb2_grpc as v2_grpc
from cifar10_serving.server.core import MAX_ECHO_BYTES
from cifar10_serving.server.launcher import ServerProcess
from tests.helpers.images import random_images
from tests.helpers.memory import budget_in_use, rss, wait_for_budget_back
from tests.helpers.rawh2 import WithholdingClient
from tests.helpers.servers import server_args

pytestmark = pytest.mark.system  # a server process, its memory and metrics read from outside

MiB = 1 << 20
BUDGET = 16 * MiB
EXPLAIN = "/cifar10.v1.Classifier/Explain"
STREAM = "/cifar10.v1.Classifier/ClassifyStream"
BIG = [("grpc.max_send_message_length", 64 * MiB), ("grpc.max_receive_message_length", 64 * MiB)]
SHORT_MESSAGE = 600  # characters: a refusal names the value and what to send, not the caller's data


def _raw(image) -> pb.Image:
    return pb.Image(raw=pb.RawTensor(shape=list(image.shape), layout=pb.LAYOUT_HWC, data=image.tobytes()))


EIGHT = [_raw(a) for a in random_images(8, seed=21)]


@pytest.fixture(scope="module")
def server(tiny_models_dir):
    with ServerProcess(server_args(tiny_models_dir, answer_budget_bytes=BUDGET)) as process:
        yield process





def _classify_works(server) -> None:
    with grpc.insecure_channel(server.target) as channel:
        response = pb_grpc.ClassifierStub(channel).Classify(pb.ClassifyRequest(images=EIGHT[:1]), timeout=10)
        assert len(response.results) == 1


# ----------------------------------------------------------------------------- the budget
def test_unread_explain_answers_are_held_in_the_budget(server):
    """Explain took no reservation: a client that never reads grew the server without bound while
    the budget's gauge stayed at 0. Now each answer is reserved until written."""
    request = pb.ExplainRequest(images=EIGHT, request_id="x" * MAX_ECHO_BYTES).SerializeToString()
    before, refusals_before = rss(server.pid), server.metric_sum("cifar10_answer_budget_refusals_total")
    clients = [WithholdingClient("127.0.0.1", server.port) for _ in range(8)]
    try:
        streams, held = [], 0.0
        for i in range(64):  # one at a time: the explanation path's own queue (5 places) stays out of it
            client = clients[i % len(clients)]
            streams.append((client, client.call(EXPLAIN, request)))
            until = time.monotonic() + 10
            while time.monotonic() < until and budget_in_use(server) <= held and not any(
                    s in c.statuses for c, s in streams[-1:]):
                client.pump(0.02)
            held = max(held, budget_in_use(server))
        refused = [c.statuses[s] for c, s in streams if s in c.statuses]
        assert held > 0, "unread Explain answers are not in the budget"
        assert budget_in_use(server) <= BUDGET
        assert server.metric_sum("cifar10_answer_budget_refusals_total") > refusals_before
        assert refused and all(code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0] for code, _ in refused), refused
        grown = rss(server.pid) - before
        assert grown < BUDGET + 64 * MiB, f"resident memory grew {grown / MiB:.0f} MiB"
        _classify_works(server)  # plain calls keep their quarter of the budget
    finally:
        for client in clients:
            client.close()
    wait_for_budget_back(server)


def test_refusals_in_an_unread_stream_are_held_in_the_budget(server):
    """A stream's refusals were answered outside the budget: an unread stream held about 68 of them,
    with whatever request_id the caller chose. Now each refusal reserves, and when even a refusal
    does not fit, the stream ends RESOURCE_EXHAUSTED."""
    refused = pb.ClassifyRequest(request_id="y" * MAX_ECHO_BYTES).SerializeToString()  # no images: INVALID_ARGUMENT
    refusals_before = server.metric_sum("cifar10_requests_total", method="ClassifyStream", code="INVALID_ARGUMENT")
    client = WithholdingClient("127.0.0.1", server.port)
    try:
        stream = client.call(STREAM)
        for _ in range(40):
            client.send(stream, refused)
            client.pump(0.02)
        until = time.monotonic() + 20
        while server.metric_sum("cifar10_requests_total", method="ClassifyStream",
                                code="INVALID_ARGUMENT") - refusals_before < 40:
            assert time.monotonic() < until, "the stream's requests were not answered"
            client.pump(0.05)
        assert budget_in_use(server) > 0, "refusals waiting to be written are not in the budget"
        assert budget_in_use(server) <= BUDGET
        _classify_works(server)
    finally:
        client.close()
    wait_for_budget_back(server)


def test_an_echoed_id_over_the_limit_is_refused_and_one_at_the_limit_is_echoed(server):
    with grpc.insecure_channel(server.target, options=BIG) as channel:
        stub = pb_grpc.ClassifierStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.Classify(pb.ClassifyRequest(images=EIGHT[:1], request_id="z" * (4 * MiB)), timeout=30)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert f"the limit is {MAX_ECHO_BYTES:,}" in info.value.details()
        assert len(info.value.details()) < SHORT_MESSAGE
        for explain in (False, True):
            with pytest.raises(grpc.RpcError) as info:
                if explain:
                    stub.Explain(pb.ExplainRequest(images=EIGHT[:1], request_id="z" * (MAX_ECHO_BYTES + 1)), timeout=30)
                else:
                    v2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(v2.ModelInferRequest(
                        model_name="tiny-max", id="z" * (MAX_ECHO_BYTES + 1), inputs=[v2.ModelInferRequest.InferInputTensor(
                            name="image", datatype="UINT8", shape=[1, 3, 32, 32])],
                        raw_input_contents=[bytes(3 * 32 * 32)]), timeout=30)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        echoed = stub.Classify(pb.ClassifyRequest(images=EIGHT[:1], request_id="z" * MAX_ECHO_BYTES), timeout=30)
        assert echoed.request_id == "z" * MAX_ECHO_BYTES


# ----------------------------------------------------------------------------- bounded messages
def _health_while(server, action) -> tuple[float, object]:
    """The slowest health check while ``action`` runs (checked every 20 ms), and what it returned."""
    stop, worst = threading.Event(), [0.0]

    def check() -> None:
        with grpc.insecure_channel(server.target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
            while not stop.is_set():
                start = time.perf_counter()
                stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
                worst[0] = max(worst[0], time.perf_counter() - start)
                time.sleep(0.02)

    checker = threading.Thread(target=check)
    checker.start()
    time.sleep(0.2)
    try:
        outcome = action()
    finally:
        stop.set()
        checker.join(30)
    return worst[0], outcome


def _refusal(call) -> grpc.RpcError:
    try:
        call()
    except grpc.RpcError as exc:
        return exc
    raise AssertionError("not refused")


HUGE = 4_000_000  # entries: a request of 4 to 8 MB


@pytest.mark.parametrize("what", ["v1 raw shape", "v1 feature_layers", "v2 shape", "v2 parameters", "v2 outputs"])
def test_a_huge_list_is_refused_in_bounded_time_with_a_short_message(server, what):
    with grpc.insecure_channel(server.target, options=BIG) as channel:
        v1, inference = pb_grpc.ClassifierStub(channel), v2_grpc.GRPCInferenceServiceStub(channel)
        tensor = v2.ModelInferRequest.InferInputTensor(name="image", datatype="UINT8", shape=[1, 3, 32, 32])
        infer = v2.ModelInferRequest(model_name="tiny-max", inputs=[tensor], raw_input_contents=[bytes(3 * 32 * 32)])
        if what == "v1 raw shape":
            request = pb.ClassifyRequest(images=[pb.Image(raw=pb.RawTensor(shape=[1] * HUGE, data=b"x"))])
            call = lambda: v1.Classify(request, timeout=30)  # noqa: E731
        elif what == "v1 feature_layers":
            request = pb.ClassifyRequest(images=EIGHT[:1], feature_layers=["a"] * HUGE)
            call = lambda: v1.Classify(request, timeout=30)  # noqa: E731
        elif what == "v2 shape":
            del infer.inputs[0].shape[:]
            infer.inputs[0].shape.extend([1] * HUGE)
            call = lambda: inference.ModelInfer(infer, timeout=30)  # noqa: E731
        elif what == "v2 parameters":
            for i in range(HUGE // 20):  # a map entry is ~20 bytes here: about the same request size
                infer.parameters[f"p{i}"].bool_param = True
            call = lambda: inference.ModelInfer(infer, timeout=30)  # noqa: E731
        else:
            infer.outputs.extend([v2.ModelInferRequest.InferRequestedOutputTensor(name="probabilities")] * (HUGE // 20))
            call = lambda: inference.ModelInfer(infer, timeout=30)  # noqa: E731
        start = time.perf_counter()
        worst, error = _health_while(server, lambda: _refusal(call))
        seconds = time.perf_counter() - start
        print(f"{what}: refused in {seconds:.2f} s, health worst {worst * 1000:.0f} ms, "
              f"{len(error.details())} characters")
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (error.code(), error.details()[:200])
        assert len(error.details()) < SHORT_MESSAGE, error.details()[:SHORT_MESSAGE]
        assert seconds < 10
        # Parsing a multi-megabyte message on the loop is gRPC's and takes some time on two cores;
        # building a message from millions of items took 0.4-1.9 s more.
        assert worst < 1.0, f"a health check took {worst:.2f} s while {what} was refused"
    _classify_works(server)
