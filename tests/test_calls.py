"""A call's bookkeeping (``server.calls``) on real metrics objects, read back from a fresh registry."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest
from prometheus_client import CollectorRegistry

from cifar10_serving.server.batching import DeadlineExpired, ModelFailure, QueueFull
from cifar10_serving.server.calls import DEADLINE_SLACK_SECONDS, INTERNAL_MESSAGE, Call, model_label
from cifar10_serving.server.errors import Code, Rejection, rejection_for
from cifar10_serving.server.metrics import METHODS, UNKNOWN_MODEL, Metrics

MODEL = "tiny-max"


@pytest.fixture
def metrics():
    return Metrics(CollectorRegistry())


def read(metrics, method="Classify", model=MODEL, code="OK", outcome=None):
    """(requests, latency samples, latency sum, images) for one label set; None where no series."""
    get = metrics.registry.get_sample_value
    labels = {"method": method, "model": model, "code": code}
    return (get("cifar10_requests_total", labels), get("cifar10_request_duration_seconds_count", labels),
            get("cifar10_request_duration_seconds_sum", labels),
            get("cifar10_images_total", {"model": model, "outcome": outcome or ("ok" if code == "OK" else code)}))


def in_flight(metrics, method="Classify"):
    return metrics.registry.get_sample_value("cifar10_requests_in_flight", {"method": method})


def run_cancelled(metrics, deadline, images=2):
    """A Call whose task is cancelled while it waits, as gRPC cancels a handler."""
    seen = {}

    async def handler():
        with Call(metrics, "ClassifyStream", MODEL, images, deadline=deadline, in_flight=True) as call:
            seen["during"] = in_flight(metrics, "ClassifyStream")
            seen["call"] = call
            await asyncio.sleep(30)

    async def main():
        task = asyncio.ensure_future(handler())
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    return seen


def test_a_call_that_returns_counts_ok_with_its_time_and_images(metrics):
    with Call(metrics, "Classify", MODEL, 3, in_flight=True) as call:
        assert in_flight(metrics) == 1
        time.sleep(0.02)
    requests, samples, seconds, images = read(metrics)
    assert (requests, samples, images) == (1, 1, 3)
    assert 0.02 <= seconds < 5
    assert call.code == Code.OK
    assert in_flight(metrics) == 0


def test_a_rejection_passes_through_with_its_code_counted(metrics):
    refusal = Rejection(Code.RESOURCE_EXHAUSTED, "queue full")
    with pytest.raises(Rejection) as info:
        with Call(metrics, "Classify", MODEL, 4, in_flight=True):
            raise refusal
    assert info.value is refusal  # the handler sees the caller's message unchanged
    assert read(metrics, code="RESOURCE_EXHAUSTED")[:2] == (1, 1)
    assert read(metrics, code="RESOURCE_EXHAUSTED")[3] == 4
    assert read(metrics)[0] is None  # nothing counted as OK
    assert in_flight(metrics) == 0


def test_an_unexpected_exception_is_internal_logged_once_and_handed_back_as_a_rejection(metrics, caplog):
    with caplog.at_level(logging.ERROR, logger="cifar10_serving.server.calls"):
        with pytest.raises(Rejection) as info:
            with Call(metrics, "GetModelInfo", MODEL, in_flight=True):
                raise ZeroDivisionError("a bug")
    assert (info.value.code, info.value.message) == (Code.INTERNAL, INTERNAL_MESSAGE)
    assert isinstance(info.value.__cause__, ZeroDivisionError)  # the log keeps the details, not the caller
    logged = [r for r in caplog.records if r.name == "cifar10_serving.server.calls"]
    assert len(logged) == 1 and "GetModelInfo" in logged[0].getMessage() and logged[0].exc_info
    assert read(metrics, method="GetModelInfo", code="INTERNAL")[:2] == (1, 1)
    assert in_flight(metrics, "GetModelInfo") == 0


@pytest.mark.parametrize("deadline_in, code", [
    (None, "CANCELLED"),  # no deadline: the caller cancelled
    (30.0, "CANCELLED"),  # far from its deadline
    (1.0, "CANCELLED"),  # cancelled about 1 s before it: past the slack, the caller cancelled
    (0.04, "DEADLINE_EXCEEDED"),  # about 0.03 s before it, within the slack: the caller's deadline fired
    (-1.0, "DEADLINE_EXCEEDED"),  # already past
])
def test_a_cancellation_is_cancelled_or_deadline_exceeded_by_the_time_left(metrics, deadline_in, code):
    assert 0.04 < DEADLINE_SLACK_SECONDS < 0.5  # the cases below straddle it (the cancel comes 0.01 s in)
    deadline = None if deadline_in is None else time.monotonic() + deadline_in
    seen = run_cancelled(metrics, deadline)
    assert seen["during"] == 1
    assert seen["call"].code == Code[code]
    assert read(metrics, method="ClassifyStream", code=code)[:2] == (1, 1)
    assert read(metrics, method="ClassifyStream", code=code)[3] == 2
    other = "DEADLINE_EXCEEDED" if code == "CANCELLED" else "CANCELLED"
    assert read(metrics, method="ClassifyStream", code=other)[0] is None
    assert in_flight(metrics, "ClassifyStream") == 0


def test_without_in_flight_the_gauge_is_untouched_and_images_may_be_counted_inside(metrics):
    with Call(metrics, "ClassifyStream", MODEL) as call:
        call.images = 5  # known only once the request is read, as for another API's request
    assert in_flight(metrics, "ClassifyStream") is None
    assert read(metrics, method="ClassifyStream")[3] == 5


def test_a_call_with_no_images_counts_no_images(metrics):
    with Call(metrics, "ListModels", ""):
        pass
    assert read(metrics, method="ListModels", model="")[:2] == (1, 1)
    images = [s for family in metrics.registry.collect() for s in family.samples if s.name == "cifar10_images_total"]
    assert images == []


def test_method_labels_are_a_declared_bounded_set(metrics):
    assert {"Classify", "ClassifyStream", "ListModels", "GetModelInfo"} <= set(METHODS)
    with pytest.raises(ValueError, match="METHODS"):
        Call(metrics, "/cifar10.v1.Classifier/Classify", MODEL)
    assert model_label(MODEL, {MODEL: object()}) == MODEL
    assert model_label("model-from-a-caller", {MODEL: object()}) == UNKNOWN_MODEL


@pytest.mark.parametrize("error, code, message", [
    (QueueFull("8 images queued; the limit is 8"), Code.RESOURCE_EXHAUSTED, "the limit is 8"),
    (DeadlineExpired("deadline passed while queued"), Code.DEADLINE_EXCEEDED, "deadline passed"),
    (ModelFailure("RuntimeError: CUDA out of memory", True), Code.RESOURCE_EXHAUSTED,
     "model 'tiny-max' failed on this batch: RuntimeError: CUDA out of memory"),
    (ModelFailure("RuntimeError: The following operation failed\n  code line\nValueError: poisoned input", False),
     Code.INTERNAL, "model 'tiny-max' failed on this batch: ValueError: poisoned input"),
])
def test_the_batchers_errors_become_rejections(error, code, message):
    rejection = rejection_for(error, MODEL)
    assert rejection.code == code
    assert message in rejection.message
    assert "code line" not in rejection.message  # a TorchScript error's code lines stay in the log
