"""The dynamic batcher on a real (tiny) TorchScript model, driven from asyncio directly."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry

from cifar10_serving.server.batching import Batcher, DeadlineExpired, QueueFull, batch_ladder
from cifar10_serving.server.metrics import Metrics
from cifar10_serving.server.models import load_artifact


@pytest.fixture(scope="module")
def model(tiny_models_dir):
    return load_artifact(tiny_models_dir / "tiny-max.pt", torch.device("cpu"))


def make(model, max_batch_size=8, delay_us=0, max_queue_images=256):
    registry = CollectorRegistry()
    batcher = Batcher(model, Metrics(registry, max_batch_size), max_batch_size, delay_us, max_queue_images)
    return batcher, registry


def images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)


def expected(model, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model.module(torch.from_numpy(x)).numpy()


def sample(registry, name, **labels):
    return registry.get_sample_value(name, {"model": "tiny-max", **labels}) or 0.0


def test_concurrent_requests_of_different_sizes_get_their_own_results(model):
    sizes = [1, 5, 3, 8, 2, 7, 1, 1, 4, 6, 8, 2]

    async def run():
        batcher, registry = make(model, max_batch_size=8)
        batcher.start()
        inputs = [images(n, seed) for seed, n in enumerate(sizes)]
        layers = [("stage2.pool",) if i % 4 == 0 else () for i in range(len(sizes))]  # 7 images: one batch
        results = await asyncio.gather(*(batcher.submit(x, l, None) for x, l in zip(inputs, layers)))
        await batcher.stop()
        return inputs, layers, results, registry

    inputs, layers, results, registry = asyncio.run(run())
    for x, wanted_layers, result in zip(inputs, layers, results):
        np.testing.assert_allclose(result.probabilities, expected(model, x), atol=1e-6)
        assert tuple(result.features) == wanted_layers
        for name in wanted_layers:
            assert result.features[name].shape[0] == len(x)
    batches = sample(registry, "cifar10_batch_size_images_count")
    assert sample(registry, "cifar10_batch_size_images_sum") == sum(sizes)
    assert batches < len(sizes)  # requests were coalesced
    assert sample(registry, "cifar10_batch_size_images_bucket", le="8.0") == batches  # never over the max


def test_a_lone_request_does_not_wait_for_the_delay(model):
    async def run():
        batcher, registry = make(model, delay_us=5_000_000)  # 5 s of patience for company
        batcher.start()
        await asyncio.sleep(0.05)
        t0 = time.monotonic()
        await batcher.submit(images(1, 0), (), None)
        elapsed = time.monotonic() - t0
        await batcher.stop()
        return elapsed, registry

    elapsed, registry = asyncio.run(run())
    assert elapsed < 2.5  # far below the 5 s delay, even on a loaded machine
    assert sample(registry, "cifar10_queue_wait_seconds_sum") < 2.5


def test_under_load_a_forming_batch_waits_for_company(model):
    async def run():
        batcher, registry = make(model, max_batch_size=8, delay_us=300_000)
        batcher.start()
        busy = asyncio.get_running_loop().create_future()
        batcher._passes.add(busy)  # a pass is in flight: the next arrival is not a lone request
        first = asyncio.ensure_future(batcher.submit(images(1, 1), (), None))
        await asyncio.sleep(0)
        batcher._passes.discard(busy)
        await asyncio.sleep(0.05)  # within the delay, company arrives
        second = asyncio.ensure_future(batcher.submit(images(1, 2), (), None))
        await asyncio.gather(first, second)
        await batcher.stop()
        return registry

    registry = asyncio.run(run())
    assert sample(registry, "cifar10_batch_size_images_count") == 1  # one pass for both
    assert sample(registry, "cifar10_batch_size_images_sum") == 2


def test_a_full_queue_sheds_at_once_and_the_queued_still_complete(model):
    async def run():
        batcher, registry = make(model, max_batch_size=4, max_queue_images=8)
        queued = [asyncio.ensure_future(batcher.submit(images(4, i), (), None)) for i in range(2)]
        await asyncio.sleep(0)  # both are queued; the batcher is not running yet
        with pytest.raises(QueueFull, match="limit is 8"):
            await batcher.submit(images(1, 9), (), None)
        batcher.start()
        results = await asyncio.gather(*queued)
        await batcher.stop()
        return results, registry

    results, registry = asyncio.run(run())
    assert [len(r.probabilities) for r in results] == [4, 4]
    assert registry.get_sample_value("cifar10_queue_images", {"model": "tiny-max"}) == 0


def test_feature_map_requests_queue_one_batch_and_never_shut_out_plain_ones(model):
    async def run():
        batcher, registry = make(model, max_batch_size=4, max_queue_images=64)
        queued = [asyncio.ensure_future(batcher.submit(images(2, i), ("stage1.conv1",), None)) for i in range(2)]
        await asyncio.sleep(0)  # one full batch of feature-map images is queued; the batcher is not running
        with pytest.raises(QueueFull, match="4 images queued for feature maps; the limit is 4"):
            await batcher.submit(images(1, 9), ("stage1.conv1",), None)
        plain = [asyncio.ensure_future(batcher.submit(images(4, 10 + i), (), None)) for i in range(8)]
        await asyncio.sleep(0)  # the rest of the queue is still open to plain requests
        batcher.start()
        results = await asyncio.gather(*queued, *plain)
        await batcher.stop()
        return results

    results = asyncio.run(run())
    assert [len(r.probabilities) for r in results] == [2, 2] + [4] * 8
    assert all(tuple(r.features) == ("stage1.conv1",) for r in results[:2])


def test_cancelled_and_expired_requests_are_dropped_before_compute(model):
    async def run():
        batcher, registry = make(model, max_batch_size=8)
        cancelled = asyncio.ensure_future(batcher.submit(images(3, 1), (), None))
        expired = asyncio.ensure_future(batcher.submit(images(2, 2), (), time.monotonic() - 1))
        kept = asyncio.ensure_future(batcher.submit(images(1, 3), (), None))
        await asyncio.sleep(0)
        cancelled.cancel()
        batcher.start()
        result = await kept
        with pytest.raises(DeadlineExpired):
            await expired
        await batcher.stop()
        return result, registry

    result, registry = asyncio.run(run())
    assert len(result.probabilities) == 1
    assert sample(registry, "cifar10_dropped_requests_total", reason="cancelled") == 1
    assert sample(registry, "cifar10_dropped_requests_total", reason="deadline") == 1
    assert sample(registry, "cifar10_batch_size_images_sum") == 1  # only the kept image was computed


class _SizeRecorder:
    """Stands in for a model's module and notes the batch size of every pass it runs."""

    def __init__(self, module) -> None:
        self.module = module
        self.sizes: set[int] = set()

    def __call__(self, x):
        self.sizes.add(len(x))
        return self.module(x)

    def forward_with_features(self, x, layers):
        self.sizes.add(len(x))
        return self.module.forward_with_features(x, layers)


def test_the_batch_ladder_is_short_ends_at_the_max_and_pads_under_a_quarter():
    assert batch_ladder(64) == (1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 14, 16, 20, 24, 28, 32, 40, 48, 56, 64)
    for top in (1, 3, 8, 10, 100, 256, 1000):
        ladder = batch_ladder(top)
        assert ladder[0] == 1 and ladder[-1] == top and list(ladder) == sorted(set(ladder))
        assert len(ladder) <= 4 * top.bit_length()  # four rungs per octave: a few hundred oneDNN kernels
        for n in range(1, top + 1):
            rung = next(r for r in ladder if r >= n)
            assert (rung - n) / rung < 0.25


def test_passes_run_only_at_ladder_sizes_and_padding_changes_no_result(model):
    """Every batch size from 1 to the max, with and without feature maps: the model only ever sees
    the ladder's sizes (oneDNN then keeps a few kernels instead of recompiling one per size), and
    each request gets what an unpadded pass gives."""
    recorder = _SizeRecorder(model.module)
    padded = dataclasses.replace(model, module=recorder)

    async def run():
        batcher, _ = make(padded, max_batch_size=16)
        batcher.warm_up(1, full=True)
        warmed = set(recorder.sizes)
        batcher.start()
        results = []
        for n in range(1, 17):
            for layers in ((), ("stage1.pool",)):
                results.append((n, layers, await batcher.submit(images(n, n), layers, None)))
        await batcher.stop()
        return batcher.ladder, warmed, results

    ladder, warmed, results = asyncio.run(run())
    assert warmed == set(ladder) and recorder.sizes == set(ladder) == {1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 14, 16}
    with torch.no_grad():
        for n, layers, result in results:
            x = torch.from_numpy(images(n, n))
            np.testing.assert_allclose(result.probabilities, model.module(x).numpy(), atol=1e-6)
            for name in layers:
                want = model.module.forward_with_features(x, list(layers))[1][name].numpy()
                assert result.features[name].shape == want.shape
                np.testing.assert_allclose(result.features[name], want, atol=1e-5)
