"""Dynamic batching: requests that arrive together share one forward pass.

One ``Batcher`` per model. RPC handlers ``submit`` decoded images and await their own results; a
single task per model takes queued requests in arrival order, up to ``max_batch_size`` images, and
runs the forward pass on a worker thread so the event loop stays free. Rules:

- A request that arrives while the model is idle and nothing is queued goes straight through.
- Under load, a forming batch may wait for company, but never past ``max_queue_delay_us`` after its
  oldest request arrived (requests that queued during the previous pass have usually waited longer
  already, so they go at once).
- The queue is bounded in images: a request that would overflow it fails at once (``QueueFull``).
  Requests for feature maps may fill only ``FEATURE_QUEUE_SHARE`` of it: their answers cost far more
  to build and send, and a queue full of them would refuse every plain request.
- Cancelled requests and requests past their deadline are dropped before compute.
- A forward pass that raises fails the requests of that batch only (``ModelFailure``).
- Forward passes run only at the batch sizes of a short ladder (``batch_ladder``): a batch of n
  images is padded with blank images up to the next rung, and warm-up runs every rung.

Why the ladder: on the CPU, oneDNN compiles kernels per input shape into a bounded cache; passes at
every size thrashed it, and the churn grew the server's memory (README, "Reliability", Memory). The
throughput the finer ladder bought is in bench/RESULTS.md.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from cifar10_serving.server.metrics import Metrics
from cifar10_serving.server.models import LoadedModel

log = logging.getLogger(__name__)

# How allocators say they ran out: CUDA raises torch.OutOfMemoryError ("out of memory"), the CPU
# allocator a RuntimeError ("can't allocate memory"), and TorchScript wraps either in its own error.
OUT_OF_MEMORY_MARKERS = ("out of memory", "can't allocate memory", "not enough memory")
# Of max_queue_images, for requests that ask for feature maps: four full batches at the defaults keep
# the model busy, and a plain request queued behind them waits for at most those four passes.
FEATURE_QUEUE_SHARE = 0.25


def batch_ladder(max_batch_size: int) -> tuple[int, ...]:
    """The batch sizes forward passes run at: four rungs per octave, so padding is under a quarter of
    any pass (about a tenth on average). Every size up to 8, then steps of a quarter of the octave:
    for 64, 1, 2, ..., 8, 10, 12, 14, 16, 20, 24, 28, 32, 40, 48, 56, 64 (20 rungs)."""
    rungs, n = [], 1
    while n < max_batch_size:
        rungs.append(n)
        n += max(1, (1 << (n.bit_length() - 1)) // 4)
    return (*rungs, max_batch_size)


class BatchError(Exception):
    """A request the batcher could not serve; ``server.calls.rejection_for`` says what the caller gets."""


class QueueFull(BatchError):
    pass


class DeadlineExpired(BatchError):
    pass


class ModelFailure(BatchError):
    def __init__(self, message: str, out_of_memory: bool) -> None:
        super().__init__(message)
        self.out_of_memory = out_of_memory


@dataclass
class BatchResult:
    probabilities: np.ndarray  # n x classes, float32
    features: dict[str, np.ndarray]  # layer -> n x shape, float32


@dataclass
class _Job:
    images: np.ndarray  # n x C x H x W uint8
    layers: tuple[str, ...]
    deadline: float | None  # time.monotonic() after which the result is useless
    future: asyncio.Future
    enqueued: float = field(default_factory=time.monotonic)
    arrived_idle: bool = False


class Batcher:
    def __init__(self, model: LoadedModel, metrics: Metrics, max_batch_size: int, max_queue_delay_us: int,
                 max_queue_images: int) -> None:
        self.model = model
        self.metrics = metrics
        self.max_batch_size = max_batch_size
        self.max_delay = max_queue_delay_us / 1e6
        self.max_queue_images = max_queue_images
        # At least one full request, whatever the share.
        self.max_queue_feature_images = max(max_batch_size, int(max_queue_images * FEATURE_QUEUE_SHARE))
        self._queue: collections.deque[_Job] = collections.deque()
        self._queued_images = 0
        self._queued_feature_images = 0
        self._busy = False
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task | None = None
        # One thread per model: forward passes of one model never overlap, so its buffer is safe.
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"forward-{model.name}")
        pin = model.device.type == "cuda"
        self._buffer = torch.empty((max_batch_size, *model.input_shape), dtype=torch.uint8, pin_memory=pin)
        self.ladder = batch_ladder(max_batch_size)
        self._layer_order = {name: i for i, name in enumerate(model.layer_names)}
        self._queue_gauge = metrics.queue_images.labels(model.name)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"batcher-{self.model.name}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        for job in self._queue:
            if not job.future.done():
                job.future.set_exception(QueueFull("server is shutting down"))
        self._queue.clear()
        self._executor.shutdown(wait=True)

    def warm_up(self, rounds: int) -> None:
        """Runs forward passes at every batch size of the ladder, with and without all feature maps,
        ``rounds`` times: every kernel the model will need is made before the server says SERVING."""
        images = np.zeros((self.max_batch_size, *self.model.input_shape), dtype=np.uint8)
        for _ in range(rounds):
            for n in self.ladder:
                self._forward([_Job(images[:n], (), None, None)])  # type: ignore[arg-type]
                self._forward([_Job(images[:n], tuple(self.model.layer_names), None, None)])  # type: ignore[arg-type]

    # ------------------------------------------------------------------ submit
    async def submit(self, images: np.ndarray, layers: tuple[str, ...], deadline: float | None) -> BatchResult:
        n = len(images)
        if self._queued_images + n > self.max_queue_images:
            raise QueueFull(
                f"model {self.model.name!r} has {self._queued_images} images queued; the limit is "
                f"{self.max_queue_images}. Retry with backoff"
            )
        if layers and self._queued_feature_images + n > self.max_queue_feature_images:
            raise QueueFull(
                f"model {self.model.name!r} has {self._queued_feature_images} images queued for feature maps; "
                f"the limit is {self.max_queue_feature_images}. Retry with backoff, or send fewer images"
            )
        job = _Job(images, layers, deadline, asyncio.get_running_loop().create_future())
        job.arrived_idle = not self._busy and not self._queue
        self._queue.append(job)
        self._queued_images += n
        if layers:
            self._queued_feature_images += n
        self._queue_gauge.set(self._queued_images)
        self._wakeup.set()
        return await job.future  # cancelling the caller cancels the future: the job is then skipped

    # ------------------------------------------------------------------ the loop
    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            await self._wait_for_company()
            jobs = self._take_batch()
            if not jobs:
                continue
            self._busy = True
            started = time.monotonic()
            for job in jobs:
                self.metrics.queue_seconds.labels(self.model.name).observe(started - job.enqueued)
            try:
                outcome = await loop.run_in_executor(self._executor, self._forward, jobs)
            except Exception as exc:  # the model raised: fail this batch, keep serving
                self._fail(jobs, exc)
                continue
            finally:
                self._busy = False
            self._deliver(jobs, outcome)

    async def _wait_for_company(self) -> None:
        first = self._queue[0]
        if self.max_delay <= 0 or first.arrived_idle:
            return
        until = first.enqueued + self.max_delay
        while self._queued_images < self.max_batch_size:
            remaining = until - time.monotonic()
            if remaining <= 0:
                return
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except asyncio.TimeoutError:
                return

    def _take_batch(self) -> list[_Job]:
        jobs: list[_Job] = []
        room = self.max_batch_size
        now = time.monotonic()
        while self._queue and len(self._queue[0].images) <= room:
            job = self._queue.popleft()
            self._queued_images -= len(job.images)
            if job.layers:
                self._queued_feature_images -= len(job.images)
            if job.future.done():  # cancelled by its caller
                self.metrics.dropped.labels(self.model.name, "cancelled").inc()
                continue
            if job.deadline is not None and now >= job.deadline:
                self.metrics.dropped.labels(self.model.name, "deadline").inc()
                job.future.set_exception(DeadlineExpired("deadline passed while queued"))
                continue
            jobs.append(job)
            room -= len(job.images)
        self._queue_gauge.set(self._queued_images)
        return jobs

    # ------------------------------------------------------------------ compute (worker thread)
    def _forward(self, jobs: list[_Job]) -> tuple[np.ndarray, dict[str, np.ndarray], float]:
        t0 = time.perf_counter()
        n = 0
        for job in jobs:
            k = len(job.images)
            self._buffer[n : n + k].copy_(torch.from_numpy(job.images))
            n += k
        # Blank padding, not whatever the previous batch left there: a previous image may be the
        # one that made the model fail.
        rung = self.ladder[bisect.bisect_left(self.ladder, n)]
        self._buffer[n:rung].zero_()
        layers = sorted({name for job in jobs for name in job.layers}, key=self._layer_order.__getitem__)
        device = self.model.device
        with torch.inference_mode():
            x = self._buffer[:rung].to(device, non_blocking=True)
            if layers:
                probs, feats = self.model.module.forward_with_features(x, layers)
            else:
                probs, feats = self.model.module(x), {}
            probs_np = probs[:n].float().cpu().numpy()
            feats_np = {name: t[:n].float().cpu().numpy() for name, t in feats.items()}
        return probs_np, feats_np, time.perf_counter() - t0

    # ------------------------------------------------------------------ results
    def _deliver(self, jobs: list[_Job], outcome) -> None:
        probs, feats, compute_seconds = outcome
        n_total = len(probs)
        self.metrics.compute_seconds.labels(self.model.name).observe(compute_seconds)
        self.metrics.batch_size.labels(self.model.name).observe(n_total)
        offset = 0
        for job in jobs:
            k = len(job.images)
            if not job.future.done():
                job.future.set_result(BatchResult(
                    probs[offset : offset + k], {name: feats[name][offset : offset + k] for name in job.layers}))
            offset += k

    def _fail(self, jobs: list[_Job], exc: Exception) -> None:
        oom = isinstance(exc, torch.OutOfMemoryError) or any(m in str(exc).lower() for m in OUT_OF_MEMORY_MARKERS)
        reason = "out_of_memory" if oom else "error"
        self.metrics.batch_failures.labels(self.model.name, reason).inc()
        log.error("model %s: forward pass of %d requests failed: %s", self.model.name, len(jobs), exc)
        if oom and self.model.device.type == "cuda":
            torch.cuda.empty_cache()
        for job in jobs:
            if not job.future.done():
                job.future.set_exception(ModelFailure(f"{type(exc).__name__}: {exc}", oom))
