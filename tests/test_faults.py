"""Faults in the model path, a full queue and passed deadlines, on a real server whose real
TorchScript model raises, runs out of memory or works slowly on marked images (tests/helpers/faulty_model.py)."""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry

from cifar10_serving.client import ClassifierClient, ClassifierError
from tests.helpers.faults import hold_the_model, slow_units, wait_for
from tests.helpers.faulty_model import HOG, POISON, export_faulty, marked
from tests.helpers.images import random_images
from tests.helpers.servers import RunningServer, make_config

BATCH = 4  # small batches make "only the requests in that batch" checkable
QUEUE = 8


@pytest.fixture(scope="module")
def faulty_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("faulty")
    export_faulty(directory, "faulty")
    return directory


@pytest.fixture(scope="module")
def faulty_server(faulty_dir):
    registry = CollectorRegistry()
    running = RunningServer(make_config(faulty_dir, default_model="faulty", max_batch_size=BATCH,
                                        max_queue_images=QUEUE, max_queue_delay_us=2000), registry)
    running.registry = registry
    yield running
    running.stop(grace=1.0)


@pytest.fixture(scope="module")
def direct(faulty_dir):
    return torch.jit.load(str(faulty_dir / "faulty.pt"), map_location="cpu").eval()


@pytest.fixture()
def faulty_client(faulty_server):
    with ClassifierClient(faulty_server.target, timeout=60) as c:
        yield c


def _metric(faulty_server, name: str, **labels) -> float:
    return faulty_server.registry.get_sample_value(name, {"model": "faulty", **labels}) or 0.0


def _expected(direct, images_hwc: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return direct(torch.from_numpy(images_hwc).permute(0, 3, 1, 2).contiguous()).numpy()


def _computed_images(faulty_server) -> float:
    """Images that went through a forward pass whose results were delivered or failed."""
    return _metric(faulty_server, "cifar10_batch_size_images_sum")


# ----------------------------------------------------------------------------- model faults
def test_an_exception_in_the_forward_pass_fails_its_request_with_internal(faulty_server, faulty_client, direct, caplog):
    images = random_images(3, seed=1)
    failures = _metric(faulty_server, "cifar10_batch_failures_total", reason="error")
    with caplog.at_level(logging.ERROR, logger="server.batching"):
        with pytest.raises(ClassifierError) as info:
            faulty_client.classify([images[0], marked(images[1], POISON), images[2]])
    assert info.value.code == grpc.StatusCode.INTERNAL
    assert "poisoned input" in info.value.details and "failed on this batch" in info.value.details
    assert "\n" not in info.value.details and "Traceback" not in info.value.details  # no model code leaks out
    assert _metric(faulty_server, "cifar10_batch_failures_total", reason="error") == failures + 1
    assert any("forward pass" in r.getMessage() and "poisoned input" in r.getMessage() for r in caplog.records)
    # the next batch runs normally
    got = faulty_client.classify(list(images))
    np.testing.assert_allclose(np.stack([r.probabilities for r in got]), _expected(direct, images), atol=1e-6)


def test_out_of_memory_in_the_forward_pass_is_resource_exhausted(faulty_server, faulty_client, direct):
    images = random_images(2, seed=2)
    failures = _metric(faulty_server, "cifar10_batch_failures_total", reason="out_of_memory")
    with pytest.raises(ClassifierError) as info:
        faulty_client.classify([marked(images[0], HOG)])
    assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "allocate" in info.value.details and "\n" not in info.value.details
    assert _metric(faulty_server, "cifar10_batch_failures_total", reason="out_of_memory") == failures + 1
    got = faulty_client.classify(list(images), layers=["stage1.pool"])
    np.testing.assert_allclose(np.stack([r.probabilities for r in got]), _expected(direct, images), atol=1e-6)


@pytest.fixture(scope="module")
def wide_server(faulty_dir):
    """Batches up to 16, so that a batch can be padded (every size up to 8 is a rung of the ladder)."""
    running = RunningServer(make_config(faulty_dir, default_model="faulty", max_batch_size=16, max_queue_images=32),
                            CollectorRegistry())
    yield running
    running.stop(grace=1.0)


def test_padding_never_reruns_an_earlier_batchs_image(wide_server, direct):
    """A batch of 9 runs padded to 10 (the batch ladder): the padding must be blank, not the poisoned
    image that the failed batch before it left in that row of the input buffer."""
    images = random_images(10, seed=4)
    with ClassifierClient(wide_server.target, timeout=60) as faulty_client:
        with pytest.raises(ClassifierError) as info:
            faulty_client.classify([*images[:9], marked(images[9], POISON)])
        assert info.value.code == grpc.StatusCode.INTERNAL
        got = faulty_client.classify(list(images[:9]))
    np.testing.assert_allclose(np.stack([r.probabilities for r in got]), _expected(direct, images[:9]), atol=1e-6)


def test_a_failing_batch_fails_only_the_requests_in_it(faulty_server, faulty_client, direct):
    n = 8  # no more than the queue holds: every call is admitted, none is shed as queue-full
    images = random_images(n, seed=3)
    poisoned = 5
    sent = [marked(images[i], POISON) if i == poisoned else images[i] for i in range(n)]
    expected = _expected(direct, images)
    barrier = threading.Barrier(n)
    failed_images = _metric(faulty_server, "cifar10_images_total", outcome="INTERNAL")

    def call(i):
        barrier.wait()
        try:
            return faulty_client.classify([sent[i]])[0].probabilities
        except ClassifierError as exc:
            return exc

    with ThreadPoolExecutor(n) as pool:
        answers = list(pool.map(call, range(n)))
    failures = [i for i, a in enumerate(answers) if isinstance(a, ClassifierError)]
    assert poisoned in failures
    assert len(failures) <= BATCH  # at most the poisoned image's batch
    for i, answer in enumerate(answers):
        if i in failures:
            assert answer.code == grpc.StatusCode.INTERNAL and "poisoned input" in answer.details
        else:
            np.testing.assert_allclose(answer, expected[i], atol=1e-6)
    # counted once the server has finished the calls, which can be just after the clients hear back
    wait_for(lambda: _metric(faulty_server, "cifar10_images_total", outcome="INTERNAL") == failed_images + len(failures))


def test_a_stream_survives_a_failing_batch(faulty_client, direct):
    n, poisoned = QUEUE, 1  # no more than the queue holds: a slow batcher must not turn one away
    images = random_images(n, seed=4)
    sent = [[marked(images[i], POISON)] if i == poisoned else [images[i]] for i in range(n)]
    answers = list(faulty_client.classify_stream(sent))
    assert [int(a.request_id) for a in answers] == sorted(int(a.request_id) for a in answers) and len(answers) == n
    failed = [i for i, a in enumerate(answers) if a.error is not None]
    assert poisoned in failed and len(failed) <= BATCH  # the stream's requests may share the poisoned batch
    expected = _expected(direct, images)
    for i, answer in enumerate(answers):
        if i in failed:
            assert answer.error.code == grpc.StatusCode.INTERNAL and "poisoned input" in answer.error.details
        else:
            np.testing.assert_allclose(answer.results[0].probabilities, expected[i], atol=1e-6)


# ----------------------------------------------------------------------------- queue and deadlines
def test_a_request_whose_deadline_passes_in_the_queue_is_not_computed(faulty_server, faulty_client, direct):
    units = slow_units(faulty_client, seconds=2.0)
    computed = _computed_images(faulty_server)
    dropped = sum(_metric(faulty_server, "cifar10_dropped_requests_total", reason=r) for r in ("deadline", "cancelled"))
    thread, result = hold_the_model(faulty_server, faulty_client, units)
    with pytest.raises(ClassifierError) as info:
        faulty_client.classify([random_images(1, seed=5)[0]], timeout=0.3)  # waits behind ~2 s of work
    assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    thread.join(120)
    assert len(result) == 1  # the slow request itself succeeded
    # the expired request was dropped before compute: only the slow image was computed since
    wait_for(lambda: sum(_metric(faulty_server, "cifar10_dropped_requests_total", reason=r)
                          for r in ("deadline", "cancelled")) == dropped + 1)
    assert _computed_images(faulty_server) == computed + 1
    images = random_images(2, seed=6)
    got = faulty_client.classify(list(images), timeout=30)
    np.testing.assert_allclose(np.stack([r.probabilities for r in got]), _expected(direct, images), atol=1e-6)


def test_a_full_queue_sheds_at_once_and_what_was_queued_succeeds(faulty_server, faulty_client, direct):
    units = slow_units(faulty_client, seconds=3.0)
    images = random_images(QUEUE + 4, seed=7)
    expected = _expected(direct, images)
    thread, slow = hold_the_model(faulty_server, faulty_client, units)
    queued_answers: dict[int, object] = {}

    def call(i):
        try:
            queued_answers[i] = faulty_client.classify([images[i]], timeout=120)[0].probabilities
        except ClassifierError as exc:
            queued_answers[i] = exc

    callers = [threading.Thread(target=call, args=(i,)) for i in range(QUEUE)]
    for caller in callers:
        caller.start()
    wait_for(lambda: _metric(faulty_server, "cifar10_queue_images") == QUEUE)
    # the queue holds QUEUE images: every further request is refused at once, while the model is busy
    for i in range(QUEUE, QUEUE + 4):
        with pytest.raises(ClassifierError) as info:
            faulty_client.classify([images[i]], timeout=30)
        assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "Retry with backoff" in info.value.details
    assert not slow  # all refused before the model came free
    thread.join(120)
    for caller in callers:
        caller.join(120)
    for i in range(QUEUE):
        np.testing.assert_allclose(queued_answers[i], expected[i], atol=1e-6)
    # recovered: a request after the burst goes straight through
    np.testing.assert_allclose(faulty_client.classify([images[-1]])[0].probabilities, expected[-1], atol=1e-6)
