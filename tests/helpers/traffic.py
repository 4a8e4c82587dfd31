"""Real traffic for the metrics tests: successes and every error the service answers, and what each should count.

``send_mix`` talks to a real server over a real channel. The errors that need a busy server (queue
full, a deadline passing in the queue, a caller cancelling) are made deterministic by holding the
model's one forward-pass thread, then waiting on the server's own gauges and counters (bounded in
time) until each request is where it should be.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cifar10_serving.protos.cifar10.v1 import classifier_pb2 as pb
from cifar10_serving.protos.cifar10.v1 import classifier_pb2_grpc as pb_grpc
from tests.helpers.images import random_images

SERVICE = "cifar10.v1.Classifier"
HEALTH = "grpc.health.v1.Health"
WAIT_SECONDS = 20.0  # generous for a loaded 2-core machine; a wait only lasts until its condition holds
HELD_CONFIG = dict(max_batch_size=4, max_queue_images=4)  # what send_mix's queue-full case assumes


def image(seed: int = 0) -> pb.Image:
    return pb.Image(raw=pb.RawTensor(shape=[32, 32, 3], dtype=pb.DTYPE_UINT8, layout=pb.LAYOUT_HWC,
                                     data=random_images(1, seed=seed)[0].tobytes()))


@dataclass
class Sent:
    """What the traffic should have counted: our series by label values, and the interceptor's."""

    requests: Counter = field(default_factory=Counter)  # (method, model, code) for cifar10_requests_total
    images: Counter = field(default_factory=Counter)  # (model, outcome) for cifar10_images_total
    handled: Counter = field(default_factory=Counter)  # (grpc_service, grpc_method, grpc_code)
    started: Counter = field(default_factory=Counter)  # (grpc_service, grpc_method)
    in_flight: float = 0.0  # cifar10_requests_in_flight{method="Classify"} while send_held's queue was full

    def call(self, method: str, model: str, code: str, images: int = 0, service: str = SERVICE,
             handled: bool = True) -> None:
        if service == SERVICE:
            self.requests[(method, model, code)] += 1
            if images:
                self.images[(model, "ok" if code == "OK" else code)] += images
        self.started[(service, method)] += 1
        if handled:
            self.handled[(service, method, code)] += 1

    def __iadd__(self, other: "Sent") -> "Sent":
        for name in ("requests", "images", "handled", "started"):
            getattr(self, name).update(getattr(other, name))
        return self


def value(registry, name: str, **labels) -> float:
    return registry.get_sample_value(name, labels) or 0.0


def wait_for(condition, what: str, seconds: float = WAIT_SECONDS) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {seconds:.0f}s for {what}")
        time.sleep(0.01)


@contextmanager
def forward_held(server, model: str):
    """Occupies every forward-pass thread of the model until the block ends, so requests queue up."""
    instances = server.app.core.batchers[model].instances
    started, release = threading.Semaphore(0), threading.Event()

    def hold():
        started.release()
        release.wait(WAIT_SECONDS * 3)

    # Each instance runs its passes on its own one-thread executor: a job there keeps it from the batcher.
    held = [instance.executor.submit(hold) for instance in instances]
    for _ in instances:
        assert started.acquire(timeout=WAIT_SECONDS)
    try:
        yield
    finally:
        release.set()
        for job in held:
            job.result(WAIT_SECONDS)


def _code(call) -> str:
    try:
        call()
        return "OK"
    except grpc.RpcError as error:
        return error.code().name


def send_simple(target: str, model: str = "tiny-max", other_model: str = "tiny-avg") -> Sent:
    """Every method, successes and the errors a single request can cause, one of each."""
    sent = Sent()
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.ClassifierStub(channel)
        for n in (1, 2, 3):
            assert _code(lambda: stub.Classify(pb.ClassifyRequest(images=[image(i) for i in range(n)]),
                                               timeout=30)) == "OK"
            sent.call("Classify", model, "OK", n)
        assert _code(lambda: stub.Classify(pb.ClassifyRequest(images=[image()], model=other_model), timeout=30)) == "OK"
        sent.call("Classify", other_model, "OK", 1)
        undecodable = pb.ClassifyRequest(images=[pb.Image(encoded=b"\x89PNG\r\n\x1a\nnot really")])
        assert _code(lambda: stub.Classify(undecodable, timeout=30)) == "INVALID_ARGUMENT"
        sent.call("Classify", model, "INVALID_ARGUMENT", 1)
        unknown = pb.ClassifyRequest(images=[image()], model="resnet-9000")
        assert _code(lambda: stub.Classify(unknown, timeout=30)) == "NOT_FOUND"
        sent.call("Classify", "unknown", "NOT_FOUND", 1)

        stream = [pb.ClassifyRequest(images=[image(1)]), pb.ClassifyRequest(), pb.ClassifyRequest(images=[image(2)])]
        answers = list(stub.ClassifyStream(iter(stream), timeout=30))
        assert [a.error.code for a in answers] == [0, grpc.StatusCode.INVALID_ARGUMENT.value[0], 0]
        sent.requests[("ClassifyStream", model, "OK")] += 2
        sent.images[(model, "ok")] += 2
        sent.requests[("ClassifyStream", model, "INVALID_ARGUMENT")] += 1
        sent.started[(SERVICE, "ClassifyStream")] += 1
        sent.handled[(SERVICE, "ClassifyStream", "OK")] += 1  # the stream itself ends OK

        assert _code(lambda: stub.ListModels(pb.ListModelsRequest(), timeout=30)) == "OK"
        sent.call("ListModels", "", "OK")
        assert _code(lambda: stub.GetModelInfo(pb.GetModelInfoRequest(name=other_model), timeout=30)) == "OK"
        sent.call("GetModelInfo", other_model, "OK")
        assert _code(lambda: stub.GetModelInfo(pb.GetModelInfoRequest(name="nope"), timeout=30)) == "NOT_FOUND"
        sent.call("GetModelInfo", "unknown", "NOT_FOUND")

        health = health_pb2_grpc.HealthStub(channel)
        assert _code(lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=30)) == "OK"
        sent.call("Check", "", "OK", service=HEALTH)
        # An unregistered method gets UNIMPLEMENTED from gRPC and no series anywhere: labels stay bounded.
        assert _code(lambda: channel.unary_unary("/cifar10.v1.Classifier/Explode")(b"", timeout=30)) == "UNIMPLEMENTED"
    return sent


def send_held(server, model: str = "tiny-max") -> Sent:
    """OK, CANCELLED, DEADLINE_EXCEEDED and RESOURCE_EXHAUSTED (queue full) on a server with ``HELD_CONFIG``.

    With the forward thread held: A is taken into a batch and waits for the thread; D queues and its
    caller cancels it; E queues and its 2 s deadline passes; B (2 images) fills the 4-image queue;
    C then finds it full. Released, A and B answer; D and E are dropped before compute.
    """
    registry = server.app.metrics.registry
    sent = Sent()

    def count(code):
        return value(registry, "cifar10_requests_total", method="Classify", model=model, code=code)

    def queued():
        return value(registry, "cifar10_queue_images", model=model)

    taken = value(registry, "cifar10_queue_wait_seconds_count", model=model)
    cancelled, expired = count("CANCELLED"), count("DEADLINE_EXCEEDED")
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.ClassifierStub(channel)
        with forward_held(server, model):
            a = stub.Classify.future(pb.ClassifyRequest(images=[image(1)]), timeout=60)
            wait_for(lambda: value(registry, "cifar10_queue_wait_seconds_count", model=model) == taken + 1,
                     "A to be taken into a batch")
            d = stub.Classify.future(pb.ClassifyRequest(images=[image(2)]), timeout=60)
            wait_for(lambda: queued() == 1, "D to queue")
            d.cancel()
            wait_for(lambda: count("CANCELLED") == cancelled + 1, "the server to see D cancelled")
            # Long enough that E is surely queued before it expires (a handler queues before its first await).
            e = stub.Classify.future(pb.ClassifyRequest(images=[image(3)]), timeout=2.0)
            wait_for(lambda: queued() == 2, "E to queue")  # D still holds its place until a batch is taken
            assert e.exception(WAIT_SECONDS).code() == grpc.StatusCode.DEADLINE_EXCEEDED
            wait_for(lambda: count("DEADLINE_EXCEEDED") == expired + 1, "the server to see E's deadline pass")
            b = stub.Classify.future(pb.ClassifyRequest(images=[image(4), image(5)]), timeout=60)
            wait_for(lambda: queued() == 4, "B to fill the queue")
            sent.in_flight = value(registry, "cifar10_requests_in_flight", method="Classify")  # A and B
            full = pb.ClassifyRequest(images=[image(6)])
            assert _code(lambda: stub.Classify(full, timeout=30)) == "RESOURCE_EXHAUSTED"
        assert len(a.result(WAIT_SECONDS).results) == 1 and len(b.result(WAIT_SECONDS).results) == 2
    sent.call("Classify", model, "OK", 1)
    sent.call("Classify", model, "OK", 2)
    # py-async-grpc-prometheus counts a call its caller ended (cancelled, deadline) as started, never handled.
    sent.call("Classify", model, "CANCELLED", 1, handled=False)
    sent.call("Classify", model, "DEADLINE_EXCEEDED", 1, handled=False)
    sent.call("Classify", model, "RESOURCE_EXHAUSTED", 1)
    return sent


def send_mix(server) -> Sent:
    sent = send_simple(server.target)
    sent += send_held(server)
    return sent
