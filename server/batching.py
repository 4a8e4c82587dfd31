"""Dynamic batching: requests that arrive together share one forward pass.

One ``Batcher`` per model. RPC handlers ``submit`` decoded images and await their own results; a
single task per model takes queued requests in arrival order, up to ``max_batch_size`` images, and
hands the batch to a free *instance* (after Triton's model instances): each runs one forward pass at
a time on its own thread, with its own input buffer and, on CUDA, its own stream, so several passes
of one model are in flight at once and the event loop stays free. ``ThreadShares`` shares the
process's intra-op threads among the passes in flight. Rules:

- A request that arrives while no pass of the model is in flight and nothing is queued goes
  straight through.
- Under load, a forming batch may wait for company, but never past ``max_queue_delay_us`` after its
  oldest request arrived (requests that queued during the previous pass have usually waited longer
  already, so they go at once).
- The queue is bounded in images: a request that would overflow it fails at once (``QueueFull``).
  Requests for feature maps may queue only one full batch of images (``max_batch_size``) beside the
  passes in flight: their answers cost far more to compute, build and send, and a plain request
  queued behind several of their passes waited seconds (bench/RESULTS.md).
- Cancelled requests and requests past their deadline are dropped before compute.
- A forward pass that raises fails the requests of that batch only (``ModelFailure``).
- Forward passes run only at the batch sizes of a short ladder (``batch_ladder``): a batch of n
  images is padded with blank images up to the next rung, and warm-up runs every rung, on every
  instance, at every thread count a pass can get.

Why the ladder: on the CPU, oneDNN compiles kernels per input shape into a bounded cache; passes at
every size thrashed it, and the churn grew the server's memory (docs/reliability.md, "Memory"). The
throughput the finer ladder bought is in bench/RESULTS.md.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import contextlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from cifar10_serving.server.metrics import Metrics
from cifar10_serving.server.models import LoadedModel
from cifar10_serving.server.priority import idle_priority, lower_priority
from cifar10_serving.server.statistics import PassTimes, Statistics

log = logging.getLogger(__name__)

# How allocators say they ran out: CUDA raises torch.OutOfMemoryError ("out of memory"), the CPU
# allocator a RuntimeError ("can't allocate memory"), and TorchScript wraps either in its own error.
OUT_OF_MEMORY_MARKERS = ("out of memory", "can't allocate memory", "not enough memory")
# Passes of at least this many images may take every thread when nothing else is in flight (ThreadShares):
# every pass when the compute threads run below the loop (--compute-nice), else from 16 images.
WIDE_PASS_IMAGES = 1
WIDE_PASS_IMAGES_SAME_PRIORITY = 16


def wide_from(compute_nice: int) -> int:
    return WIDE_PASS_IMAGES if compute_nice > 0 else WIDE_PASS_IMAGES_SAME_PRIORITY


# Warmed before a model is ready: the rungs a lone caller and light load meet first. The rest of the
# ladder, and feature maps, are warmed after, in the background (``warm_up_background``).
FIRST_RUNGS = (1, 2, 4, 8)


def batch_ladder(max_batch_size: int) -> tuple[int, ...]:
    """The batch sizes forward passes run at: four rungs per octave, so padding is under a quarter of
    any pass (about a tenth on average). Every size up to 8, then steps of a quarter of the octave:
    for 64, 1, 2, ..., 8, 10, 12, 14, 16, 20, 24, 28, 32, 40, 48, 56, 64 (20 rungs)."""
    rungs, n = [], 1
    while n < max_batch_size:
        rungs.append(n)
        n += max(1, (1 << (n.bit_length() - 1)) // 4)
    return (*rungs, max_batch_size)


class ThreadShares:
    """The intra-op threads that the forward passes of one process share (``--torch-threads``).

    A pass of at least ``wide_from`` images that starts while no other is in flight gets all of them:
    a lone large request on an idle server uses every core it may. Every other pass gets an equal
    share over every instance of every model (at least one), so that a loaded server runs its passes
    side by side on their own cores instead of each asking for them all. By default every lone pass
    goes wide, a single image too: one caller's single images were faster at the median and 8 and
    32 callers lost nothing (bench/RESULTS.md, "Compute below the loop, and lone passes wide"). Before the compute threads ran nicer than the loop (``--compute-nice``)
    this did not pay: the second thread's OpenMP spin-wait after each small pass took the core the
    event loop needed, so with ``--compute-nice 0`` passes go wide only from 16 images. Two sizes only:
    every size a pass can get is a set of oneDNN kernels that warm-up must make. Used from the event
    loop only: no lock.
    """

    def __init__(self, threads: int, instances: int, wide_from: int = WIDE_PASS_IMAGES) -> None:
        if threads < 1 or instances < 1:
            raise ValueError(f"a thread budget needs threads and instances >= 1, got {threads} and {instances}")
        self.threads = threads
        self.share = max(1, threads // instances)
        self.wide_from = wide_from
        self.in_flight = 0

    @property
    def sizes(self) -> tuple[int, ...]:
        """Every thread count a pass can get, for warm-up."""
        return tuple(sorted({self.threads, self.share}))

    def take(self, images: int) -> int:
        wide = self.in_flight == 0 and images >= self.wide_from
        self.in_flight += 1
        return self.threads if wide else self.share

    def give_back(self) -> None:
        self.in_flight -= 1


class _Instance:
    """Runs one forward pass of a model at a time, on its own thread: its input buffer (pinned on
    CUDA, so the copy to the device is asynchronous) and its CUDA stream are used by no other pass."""

    def __init__(self, model: LoadedModel, index: int | str, max_batch_size: int, nice: int = 0,
                 initializer=None) -> None:
        self.executor = ThreadPoolExecutor(1, thread_name_prefix=f"forward-{model.name}-{index}",
                                           initializer=initializer or lower_priority,
                                           initargs=() if initializer else (nice,))
        cuda = model.device.type == "cuda"
        self.buffer = torch.empty((max_batch_size, *model.input_shape), dtype=torch.uint8, pin_memory=cuda)
        # The same memory as a numpy array: requests are copied in with numpy, which for a few KB is a
        # tenth of the cost of torch's slicing and copy_ dispatch, and releases the GIL for large copies.
        self.staging = self.buffer.numpy()
        self.stream = torch.cuda.Stream(model.device) if cuda else None

    def on_stream(self):
        return torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()


class BatchError(Exception):
    """A request the batcher could not serve; ``server.errors.rejection_for`` says what the caller gets."""


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
                 max_queue_images: int, instances: int = 1, budget: ThreadShares | None = None,
                 nice: int = 0, statistics: Statistics | None = None,
                 compiled_min_batch: tuple[int, int] = (0, 0)) -> None:
        if instances < 1:
            raise ValueError(f"instances must be at least 1, got {instances}")
        self.model = model
        self.metrics = metrics
        self.statistics = statistics if statistics is not None else Statistics()
        self.max_batch_size = max_batch_size
        self.max_delay = max_queue_delay_us / 1e6
        self.max_queue_images = max_queue_images
        # One full batch for feature maps: a plain request waits behind at most that one and the
        # passes in flight (a quarter of the queue, four batches at the defaults, was seconds).
        self.max_queue_feature_images = min(max_batch_size, max_queue_images)
        self._queue: collections.deque[_Job] = collections.deque()
        self._queued_images = 0
        self._queued_feature_images = 0
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._closing = False
        self.instances = [_Instance(model, i, max_batch_size, nice) for i in range(instances)]
        self.budget = budget if budget is not None else ThreadShares(torch.get_num_threads(), instances, wide_from(nice))
        self._free: asyncio.Queue[_Instance] = asyncio.Queue()  # instances with no pass in flight
        for instance in self.instances:
            self._free.put_nowait(instance)
        self._passes: set[asyncio.Task] = set()
        self.ladder = batch_ladder(max_batch_size)
        # The rungs the compiled package runs, where the model has one (docs/compiled.md), for passes on one
        # thread and on more (``compiled_min_batch``: the least rung of each; 0: none); the rest the TorchScript.
        compiled, (narrow, wide) = model.compiled, compiled_min_batch
        self._compiled_rungs = tuple(
            frozenset(n for n in self.ladder if compiled is not None and narrow and least <= n <= compiled.max_batch)
            for least in (narrow, wide))
        self._layer_order = {name: i for i, name in enumerate(model.layer_names)}
        # The per-pass series, looked up once: ``labels`` takes a lock and builds a key on every call.
        self._queue_gauge = metrics.queue_images.labels(model.name)
        self._queue_seconds = metrics.queue_seconds.labels(model.name)
        self._compute_seconds = metrics.compute_seconds.labels(model.name)
        self._batch_size = metrics.batch_size.labels(model.name)
        self._compiled_passes = metrics.compiled_passes.labels(model.name)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"batcher-{self.model.name}")

    async def stop(self) -> None:
        """Stops taking batches; the passes in flight finish and answer; what is still queued is refused."""
        self._closing = True  # a background warm-up stops at its next pass
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        await asyncio.gather(*self._passes)
        for job in self._queue:
            if not job.future.done():
                job.future.set_exception(QueueFull("server is shutting down"))
        self._queue.clear()
        for instance in self.instances:
            instance.executor.shutdown(wait=True)

    @property
    def closing(self) -> bool:
        """Whether ``stop`` has begun: nothing more is warmed or taken."""
        return self._closing

    async def retire(self) -> None:
        """Stops once what is queued has been computed and answered: for a model version that is
        being replaced or unloaded, whose callers still wait on it."""
        while self._queue or self._passes:
            await asyncio.sleep(0.01)
        await self.stop()

    def warm_up(self, rounds: int, full: bool = False) -> None:
        """Runs forward passes ``rounds`` times at the first rungs of the ladder (``FIRST_RUNGS``),
        without feature maps (``full``: every rung, with and without all feature maps), at every
        thread count a pass of that size can get, before the model serves. oneDNN makes kernels per
        shape and thread count, shared by every thread, so the first instance makes them; OpenMP gives
        each calling thread its own team of workers, made the first time it asks for more than one,
        so every other instance runs one pass at each thread count. Blocks: call it off the loop."""
        for i, instance in enumerate(self.instances):
            instance.executor.submit(self._warm_up, instance, rounds if i == 0 else 0, full).result()

    def warm_up_background(self, full: bool = True) -> None:
        """Warms beside serving passes, on a thread and input buffer of its own that runs only when no
        other thread wants a core (``server.priority.idle_priority``): the first rungs of a model
        loaded while others serve (``full`` False), or the rest of the ladder and the feature maps of
        one that serves (a call that meets a kernel not yet made is answered all the same, a little
        slower). oneDNN's kernels are the process's, so the serving threads find them made. Blocks."""
        warmer = _Instance(self.model, "warm", self.max_batch_size, initializer=idle_priority)
        try:
            warmer.executor.submit(self._warm_up, warmer, 1, full).result()
        finally:
            warmer.executor.shutdown(wait=True)

    def _warm_up(self, instance: _Instance, rounds: int, full: bool) -> None:
        images = np.zeros((self.max_batch_size, *self.model.input_shape), dtype=np.uint8)
        ladder = self.ladder if full else tuple(n for n in self.ladder if n in FIRST_RUNGS) or self.ladder[:1]
        wide = [n for n in ladder if n >= self.budget.wide_from]
        for threads in self.budget.sizes:
            sizes = ladder if threads == self.budget.share else wide
            for n in (sizes * rounds) or sizes[-1:]:  # rounds 0: one pass, for this thread's team
                for layers in (((), tuple(self.model.layer_names)) if full else ((),)):
                    if self._closing:
                        return
                    self._forward(instance, [_Job(images[:n], layers, None, None)], threads)  # type: ignore[arg-type]

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
        job.arrived_idle = not self._passes and not self._queue
        self._queue.append(job)
        self._queued_images += n
        if layers:
            self._queued_feature_images += n
        self._queue_gauge.set(self._queued_images)
        self._wakeup.set()
        return await job.future  # cancelling the caller cancels the future: the job is then skipped

    # ------------------------------------------------------------------ the loop
    async def _run(self) -> None:
        while True:
            instance = await self._free.get()  # a batch forms only once it has somewhere to run
            while not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
            await self._wait_for_company()
            jobs = self._take_batch()
            if not jobs:
                self._free.put_nowait(instance)
                continue
            task = asyncio.get_running_loop().create_task(self._pass(instance, jobs))
            self._passes.add(task)
            task.add_done_callback(self._passes.discard)

    async def _pass(self, instance: _Instance, jobs: list[_Job]) -> None:
        started = time.monotonic()
        for job in jobs:
            self._queue_seconds.observe(started - job.enqueued)
        threads = self.budget.take(sum(len(job.images) for job in jobs))
        try:
            outcome = await asyncio.get_running_loop().run_in_executor(
                instance.executor, self._forward, instance, jobs, threads)
        except Exception as exc:  # the model raised: fail this batch, keep serving
            self._fail(jobs, exc)
        else:
            self._deliver(jobs, outcome, started)
        finally:
            self.budget.give_back()
            self._free.put_nowait(instance)

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
    def _forward(self, instance: _Instance, jobs: list[_Job], threads: int
                 ) -> tuple[np.ndarray, dict[str, np.ndarray], float, PassTimes]:
        t0 = time.perf_counter()
        n0 = time.perf_counter_ns()
        # OpenMP's thread count belongs to the calling thread: this sets this instance's only.
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        buffer, staging = instance.buffer, instance.staging
        n = 0
        for job in jobs:
            k = len(job.images)
            staging[n : n + k] = job.images
            n += k
        # Blank padding, not whatever the previous batch left there: a previous image may be the
        # one that made the model fail.
        rung = self.ladder[bisect.bisect_left(self.ladder, n)]
        if rung > n:
            staging[n:rung] = 0
        layers = sorted({name for job in jobs for name in job.layers}, key=self._layer_order.__getitem__)
        with torch.inference_mode(), instance.on_stream():
            try:
                x = buffer[:rung].to(self.model.device, non_blocking=True)
                n1 = time.perf_counter_ns()
                if rung in self._compiled_rungs[threads > 1]:
                    module = self.model.compiled
                    if jobs[0].future is not None:  # a call's pass, not warm-up's
                        self._compiled_passes.inc()
                else:
                    module = self.model.module
                if layers:
                    probs, feats = module.forward_with_features(x, layers)
                else:
                    probs, feats = module(x), {}
                n2 = time.perf_counter_ns()
                # Copies to the host on this stream and waits for it: the buffer is free again after.
                probs_np = probs[:n].float().cpu().numpy()
                feats_np = {name: t[:n].float().cpu().numpy() for name, t in feats.items()}
            except BaseException:
                if instance.stream is not None:  # a pass that failed midway may still be reading the buffer
                    instance.stream.synchronize()
                raise
        # On CUDA the copy in and the pass are queued asynchronously: their split is the host's view.
        times = PassTimes(n1 - n0, n2 - n1, time.perf_counter_ns() - n2)
        return probs_np, feats_np, time.perf_counter() - t0, times

    # ------------------------------------------------------------------ results
    def _deliver(self, jobs: list[_Job], outcome, started: float) -> None:
        probs, feats, compute_seconds, times = outcome
        n_total = len(probs)
        self._compute_seconds.observe(compute_seconds)
        self._batch_size.observe(n_total)
        self.statistics.record_pass(n_total, times, [int((started - job.enqueued) * 1e9) for job in jobs])
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
