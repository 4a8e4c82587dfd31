"""Model instances: several forward passes of one model in flight at once (server/batching.py).

The batcher is driven from asyncio directly, on a real tiny model wrapped so that a pass can wait at a
barrier (two passes that both reach it were in flight together: no timing involved) or at a gate held
shut by the test; one server test uses the real slow model of tests/helpers/faulty_model.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time

import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry

from cifar10_serving.server.batching import Batcher, DeadlineExpired, ModelFailure, QueueFull, ThreadShares, wide_from
from cifar10_serving.server.config import ServerConfig, default_instances, default_torch_threads, parse_config
from cifar10_serving.server.metrics import Metrics
from cifar10_serving.server.models import load_artifact
from tests.helpers.faulty_model import POISON, SLOW, export_faulty, marked
from tests.helpers.images import random_images
from tests.helpers.servers import RunningServer, make_config

WAIT_SECONDS = 30  # only ever waited out when the behaviour under test is broken
SLOW_UNITS = 64  # 64 matmuls of 1024 x 1024 on one thread: a second or more even on a fast core


@pytest.fixture(scope="module")
def model(tiny_models_dir):
    return load_artifact(tiny_models_dir / "tiny-max.pt", torch.device("cpu"))


class _Watched:
    """Stands in for a model's module: notes each pass's thread, thread count and batch size and the
    most passes ever in flight at once; ``before`` runs first in every pass (a barrier, a gate)."""

    def __init__(self, module, before=None) -> None:
        self.module = module
        self.before = before
        self.lock = threading.Lock()
        self.in_flight = self.most_in_flight = 0
        self.passes: list[tuple[str, int, int]] = []  # (thread name, torch threads, batch size)

    def _enter(self, x) -> None:
        with self.lock:
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
            self.passes.append((threading.current_thread().name, torch.get_num_threads(), len(x)))
        if self.before is not None:
            self.before(x)

    def _run(self, method, *args):
        self._enter(args[0])
        try:
            return method(*args)
        finally:
            with self.lock:
                self.in_flight -= 1

    def __call__(self, x):
        return self._run(self.module, x)

    def forward_with_features(self, x, layers):
        return self._run(self.module.forward_with_features, x, layers)


def make(model, module, instances, max_batch_size=1, max_queue_images=8, budget=None):
    """A batcher of ``instances`` over ``module``; one image per pass by default, so each request is its own pass."""
    registry = CollectorRegistry()
    batcher = Batcher(dataclasses.replace(model, module=module), Metrics(registry, max_batch_size), max_batch_size,
                      0, max_queue_images, instances, budget)
    return batcher, registry


def images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)


def expected(model, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model.module(torch.from_numpy(x)).numpy()


def _barrier(parties: int):
    barrier = threading.Barrier(parties, timeout=WAIT_SECONDS)
    return lambda x: barrier.wait()  # broken (the pass raises) unless `parties` passes wait together


def test_two_instances_run_two_passes_at_once_each_answering_its_own_caller(model):
    watched = _Watched(model.module, before=_barrier(2))

    async def run():
        batcher, _ = make(model, watched, instances=2)
        batcher.start()
        inputs = [images(1, seed) for seed in range(6)]
        results = await asyncio.gather(*(batcher.submit(x, (), None) for x in inputs))
        await batcher.stop()
        return inputs, results

    inputs, results = asyncio.run(run())
    assert watched.most_in_flight == 2
    assert len({thread for thread, _, _ in watched.passes}) == 2  # each instance on its own thread
    for x, result in zip(inputs, results):
        np.testing.assert_allclose(result.probabilities, expected(model, x), atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_two_instances_on_cuda_each_on_its_own_stream_answer_like_the_cpu(tiny_models_dir, model):
    gpu = load_artifact(tiny_models_dir / "tiny-max.pt", torch.device("cuda"))
    watched = _Watched(gpu.module, before=_barrier(2))

    async def run():
        batcher, _ = make(gpu, watched, instances=2, max_batch_size=4)
        assert len({id(instance.stream) for instance in batcher.instances}) == 2
        batcher.start()
        inputs = [images(4, seed) for seed in range(6)]  # six full passes: the barrier meets them in pairs
        results = await asyncio.gather(*(batcher.submit(x, (), None) for x in inputs))
        await batcher.stop()
        return inputs, results

    inputs, results = asyncio.run(run())
    assert watched.most_in_flight == 2
    for x, result in zip(inputs, results):
        np.testing.assert_allclose(result.probabilities, expected(model, x), atol=2e-2)  # TF32 on CUDA


def test_one_instance_never_overlaps_passes(model):
    watched = _Watched(model.module)

    async def run():
        batcher, _ = make(model, watched, instances=1)
        batcher.start()
        inputs = [images(1, seed) for seed in range(6)]
        results = await asyncio.gather(*(batcher.submit(x, (), None) for x in inputs))
        await batcher.stop()
        return inputs, results

    inputs, results = asyncio.run(run())
    assert watched.most_in_flight == 1 and len(watched.passes) == 6
    for x, result in zip(inputs, results):
        np.testing.assert_allclose(result.probabilities, expected(model, x), atol=1e-6)


def test_a_failing_pass_fails_its_own_batch_only_while_another_is_in_flight(tmp_path):
    faulty = load_artifact(export_faulty(tmp_path), torch.device("cpu"))
    watched = _Watched(faulty.module, before=_barrier(2))
    good, bad = random_images(1, seed=1), random_images(1, seed=2)
    bad[0] = marked(bad[0], POISON)

    async def run():
        batcher, registry = make(faulty, watched, instances=2)
        batcher.start()
        outcomes = await asyncio.gather(batcher.submit(good.transpose(0, 3, 1, 2).copy(), (), None),
                                        batcher.submit(bad.transpose(0, 3, 1, 2).copy(), (), None),
                                        return_exceptions=True)
        watched.before = None
        after = await batcher.submit(good.transpose(0, 3, 1, 2).copy(), (), None)  # both instances still serve
        await batcher.stop()
        return outcomes, after, registry

    (ok, failed), after, registry = asyncio.run(run())
    assert watched.most_in_flight == 2
    assert isinstance(failed, ModelFailure) and "poisoned input" in str(failed)
    want = expected(faulty, good.transpose(0, 3, 1, 2).copy())
    np.testing.assert_allclose(ok.probabilities, want, atol=1e-6)
    np.testing.assert_allclose(after.probabilities, want, atol=1e-6)
    assert registry.get_sample_value("cifar10_batch_failures_total", {"model": "faulty", "reason": "error"}) == 1


def test_with_every_instance_busy_the_queue_limit_and_deadlines_still_hold(model):
    gate = threading.Event()
    watched = _Watched(model.module, before=lambda x: gate.wait(WAIT_SECONDS))

    async def run():
        batcher, registry = make(model, watched, instances=2, max_batch_size=2, max_queue_images=4)
        batcher.start()
        running = [asyncio.ensure_future(batcher.submit(images(2, i), (), None)) for i in range(2)]
        while len(watched.passes) < 2:  # both instances are now held at the gate
            await asyncio.sleep(0.01)
        expired = asyncio.ensure_future(batcher.submit(images(1, 5), (), time.monotonic() + 0.01))
        queued = [asyncio.ensure_future(batcher.submit(images(1, i), (), None)) for i in range(6, 9)]
        await asyncio.sleep(0.05)  # the expired request's deadline passes while it waits
        with pytest.raises(QueueFull, match="limit is 4"):
            await batcher.submit(images(1, 9), (), None)
        gate.set()
        results = await asyncio.gather(*running, *queued)
        with pytest.raises(DeadlineExpired):
            await expired
        await batcher.stop()
        return results, registry

    results, registry = asyncio.run(run())
    assert watched.most_in_flight == 2  # both instances were held, not one after the other
    assert [len(r.probabilities) for r in results] == [2, 2, 1, 1, 1]
    assert registry.get_sample_value("cifar10_dropped_requests_total", {"model": "tiny-max", "reason": "deadline"}) == 1
    assert registry.get_sample_value("cifar10_batch_size_images_sum", {"model": "tiny-max"}) == 7


def test_a_lone_pass_gets_the_whole_budget_and_one_beside_it_a_share(model):
    watched = _Watched(model.module, before=_barrier(2))

    async def run():
        batcher, _ = make(model, watched, instances=2, budget=ThreadShares(2, 2, wide_from=1))
        batcher.start()
        first = asyncio.ensure_future(batcher.submit(images(1, 1), (), None))
        await asyncio.sleep(0)  # the first pass starts alone
        second = asyncio.ensure_future(batcher.submit(images(1, 2), (), None))
        await asyncio.gather(first, second)
        await batcher.stop()

    asyncio.run(run())
    assert sorted(threads for _, threads, _ in watched.passes) == [1, 2]  # their threads may start in either order


def test_the_budget_has_two_sizes_the_whole_and_an_even_share():
    budget = ThreadShares(8, 3, wide_from=16)
    assert budget.sizes == (2, 8)
    assert [budget.take(16), budget.take(64), budget.take(64)] == [8, 2, 2]
    budget.give_back(), budget.give_back(), budget.give_back()
    assert budget.take(64) == 8  # idle again: the next large pass gets every thread
    budget.give_back()
    assert budget.take(15) == 2  # a small pass never goes wide, even alone
    assert ThreadShares(2, 8).sizes == (1, 2) and ThreadShares(1, 2).sizes == (1,)
    with pytest.raises(ValueError, match="instances >= 1"):
        ThreadShares(2, 0)


def test_a_lone_single_image_goes_wide_only_when_the_compute_runs_below_the_loop():
    assert ThreadShares(2, 2, wide_from(10)).take(1) == 2  # the default --compute-nice
    assert ThreadShares(2, 2, wide_from(0)).take(1) == 1  # same priority: the spin-wait would take the loop's core
    assert ThreadShares(2, 2, wide_from(0)).take(16) == 2


def test_warm_up_makes_every_kernel_once_and_every_instance_its_thread_team(model):
    watched = _Watched(model.module)
    batcher, _ = make(model, watched, instances=2, max_batch_size=4, budget=ThreadShares(2, 2, wide_from=3))
    batcher.warm_up(1, full=True)
    first, second = dict.fromkeys(thread for thread, _, _ in watched.passes)  # in the order they ran
    seen = {t: {(threads, n) for thread, threads, n in watched.passes if thread == t} for t in (first, second)}
    assert batcher.ladder == (1, 2, 3, 4)
    # the first instance: every rung at the share, the rungs a lone pass may take wide at every thread
    assert seen[first] == {(1, n) for n in batcher.ladder} | {(2, 3), (2, 4)}
    assert seen[second] == {(1, 4), (2, 4)}  # one pass at each thread count it can get
    asyncio.run(batcher.stop())


def test_before_a_model_serves_only_the_first_rungs_are_warmed_and_the_rest_after_on_a_thread_of_its_own(model):
    watched = _Watched(model.module)
    batcher, _ = make(model, watched, instances=2, max_batch_size=4, budget=ThreadShares(2, 2, wide_from=3))
    batcher.warm_up(1)  # before serving: FIRST_RUNGS of the ladder (1, 2, 4 here), no feature maps
    first, second = dict.fromkeys(thread for thread, _, _ in watched.passes)
    seen = {t: {(threads, n) for thread, threads, n in watched.passes if thread == t} for t in (first, second)}
    assert seen[first] == {(1, 1), (1, 2), (1, 4), (2, 4)} and seen[second] == {(1, 4), (2, 4)}
    before = len(watched.passes)
    batcher.warm_up_background()  # after: every rung, with and without feature maps, on a warm-up thread
    rest = watched.passes[before:]
    assert {thread for thread, _, _ in rest}.isdisjoint({first, second})
    assert {(threads, n) for _, threads, n in rest} == {(1, n) for n in batcher.ladder} | {(2, 3), (2, 4)}
    asyncio.run(batcher.stop())


def test_a_slow_pass_on_a_real_server_does_not_hold_up_the_other_instance(tmp_path):
    from cifar10_serving.client import ClassifierClient

    export_faulty(tmp_path)
    server = RunningServer(make_config(tmp_path, default_model="faulty", instances=2, max_queue_delay_us=0))
    try:
        assert [len(b.instances) for b in server.app.core.batchers.values()] == [2]
        with ClassifierClient(server.target, timeout=120) as client:
            slow = threading.Thread(target=client.classify, args=([marked(random_images(1)[0], SLOW + (SLOW_UNITS,))],))
            slow.start()
            batcher = server.app.core.batchers["faulty"]
            deadline = time.monotonic() + WAIT_SECONDS
            while not batcher._passes:  # the slow pass is in flight
                assert time.monotonic() < deadline
                time.sleep(0.01)
            client.classify(list(random_images(2, seed=3)))  # served by the other instance meanwhile
            assert slow.is_alive()
            slow.join(120)
    finally:
        server.stop(grace=1.0)


# ----------------------------------------------------------------------------- configuration
def test_instances_and_torch_threads_are_validated_and_read_from_flags_and_env(model):
    assert parse_config([], {}).instances == 0  # automatic
    assert parse_config([], {"CIFAR10_INSTANCES": "3"}).instances == 3
    assert parse_config(["--instances", "2"], {"CIFAR10_INSTANCES": "3"}).instances == 2
    with pytest.raises(ValueError, match="instances must be >= 0"):
        ServerConfig(instances=-1)
    with pytest.raises(ValueError, match="torch_threads must be >= 0"):
        ServerConfig(torch_threads=-1)
    with pytest.raises(ValueError, match="instances must be at least 1"):
        make(model, model.module, instances=0)


def test_automatic_counts_follow_the_cores_this_process_may_use(monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 2, 5})  # e.g. taskset -c 0,2,5
    assert default_torch_threads() == 3 and default_torch_threads(workers=2) == 1 and default_torch_threads(4) == 1
    assert default_instances("cpu", 3) == 3
    assert default_instances("cuda", 16) == 2
