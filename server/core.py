"""The serving core: what every API shares, in no API's words.

``ServingCore`` owns the model set (``server.repository``: versions, loading and unloading while
serving) and its lookup by name and version, the answer budget (``server.answer_budget``), decoding
(``server.images`` on the fair lanes of ``server.decode_lanes``), the batchers (``server.batching``)
and their statistics, the thread that encodes large answers off the event loop, and the explanation
path (``server.explain``). A request's path through it reads in order::

    model = core.model(name, version)        # NOT_FOUND names what is loaded
    lease = core.reserve(model, ...)         # RESOURCE_EXHAUSTED before any work; holds the version
    images = await core.decode(model, sources, resize, deadline)
    result = await core.infer(model, images, layers, deadline, lease)
    answer = await core.off_loop(encode, ...)  # when the answer is large
    lease.release()                          # once the answer is written

Front-ends (``server.cifar10_v1``, ``server.open_inference``) translate their protocol's messages
into these calls and the results back; the core imports no protocol (tests/test_imports.py). Every
refusal is a ``server.errors.Rejection``. Used from the event loop's thread.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence, TypeVar

import numpy as np
import torch

from cifar10_serving.server import filters as filter_weights
from cifar10_serving.server.answer_budget import (ECHO_COPIES, AnswerBudget, OverBudget, Reservation, answer_bytes,
                                                  default_budget_bytes, explanation_bytes, layer_elements,
                                                  refusal_bytes)
from cifar10_serving.server.batching import Batcher, BatchError, BatchResult, ThreadShares, wide_from
from cifar10_serving.server.calls import model_label
from cifar10_serving.server.config import ServerConfig
from cifar10_serving.server.decode_lanes import DecodeExpired, Decoder
from cifar10_serving.server.errors import Code, Rejection, invalid, rejection_for
from cifar10_serving.server.explain import Explainer, Maps
from cifar10_serving.server.filters import LayerWeights, WeightStore
from cifar10_serving.server.images import ImageError, Raw, Resize, Source, decode_into, to_uint8
from cifar10_serving.server.metrics import Metrics
from cifar10_serving.server.models import LoadedModel, ModelLoadError, load_artifact
from cifar10_serving.server.priority import lower_priority
from cifar10_serving.server.repository import (TRITON_FILE, FileVersion, Lease, Repository,
                                               Version)
from cifar10_serving.server.statistics import VersionStatistics
from cifar10_serving.server.worker_statistics import WorkerStatistics

T = TypeVar("T")

# Answers with feature maps are built on this thread, off the event loop (server.wire): tens of
# megabytes copied on the loop would hold every call's progress and health check with it. One
# thread: more would only compete with the loop for the GIL and the machine's memory bandwidth.
ENCODE_THREADS = 1
# The longest request id (cifar10.v1 ``request_id``, the Open Inference Protocol's ``id``) echoed in
# answers: a UUID is 36 bytes, a W3C traceparent 55. Longer ids are refused rather than held in
# every answer, stream refusal and log line.
MAX_ECHO_BYTES = 1024

log = logging.getLogger(__name__)


class ServingCore:
    """``device``: where models run; ``threads``: the torch threads every forward pass shares;
    ``instances``: passes of one model in flight at once. ``await start()`` loads the repository."""

    def __init__(self, config: ServerConfig, metrics: Metrics, *, device: torch.device, threads: int,
                 instances: int, explainer: Explainer | None = None) -> None:
        self.config = config
        self.metrics = metrics
        self.device = device
        self.threads = threads
        self.shares: ThreadShares | None = None  # sized at start, once the repository is read
        self.instances = instances
        self.validators: list[Callable[[LoadedModel], object]] = []  # front-ends' checks of a model they will serve
        self.repository = Repository(config.models_dir, config.model_control_mode,
                                     config.policy, self._load, self._warm, self._changed)
        # With --workers, statistics are every worker's: this one's are served to its siblings from now on.
        self.worker_statistics = WorkerStatistics.of(config, self.repository.serving)
        self._warm_queue: asyncio.Queue[Batcher] | None = None  # the rest of each model's warm-up, in the background
        self._serving = False
        self.budget = AnswerBudget(config.answer_budget_bytes or default_budget_bytes(), metrics)
        self.decoder = Decoder(metrics, config.max_image_pixels, config.max_request_pixels, config.compute_nice)
        self.explainer = explainer or Explainer(config.compute_nice)
        self.weights = WeightStore()  # each version's trained weights, read on its first GetFilters
        self._encode_pool = ThreadPoolExecutor(ENCODE_THREADS, thread_name_prefix="encode",
                                               initializer=lower_priority, initargs=(config.compute_nice,))

    # ------------------------------------------------------------------ the model set
    @property
    def default_model(self) -> str:
        return self.config.default_model

    def models(self) -> list[LoadedModel]:
        """Every version ready to serve, by name, then version."""
        return [entry.model for entry in self.repository.serving()]

    def model(self, name: str, version: str = "") -> LoadedModel:
        """The model a request names ("" for the default), at ``version`` if it names one, else its
        latest ready version."""
        return self.repository.lookup(name or self.config.default_model, version).model

    def label(self, name: str) -> str:
        """The metrics' model label for a request naming ``name``: a loaded model's name, else "unknown"."""
        return model_label(name or self.config.default_model, self.repository.serving_names())

    def batcher(self, model: LoadedModel) -> Batcher:
        return self.repository.entry(model).batcher

    @property
    def batchers(self) -> dict[str, Batcher]:
        """Each model's batcher (its latest ready version's), by name: for tests and tools."""
        return {entry.name: entry.batcher for entry in self.repository.serving()}

    async def statistics(self, name: str = "", version: str = "") -> list[VersionStatistics]:
        """The statistics a request asks for: every ready version's, one model's, or one version's; with
        ``--workers``, the whole server's (``server.worker_statistics``: UNAVAILABLE while a worker cannot say)."""
        return await self.worker_statistics.total(self._asked(name, version))

    @property
    def server_instances(self) -> int:
        """ModelConfig's instance count: ``instances`` in every process of the server (each worker of
        ``--workers`` runs its own)."""
        return self.instances * self.worker_statistics.workers

    def _asked(self, name: str, version: str) -> list[Version]:
        """The versions whose statistics a request asks for: every ready one, one model's, or one."""
        if not name:
            return self.repository.serving()
        if version:
            return [self.repository.lookup(name, version)]
        self.repository.lookup(name)  # NOT_FOUND for a model that does not serve
        return [e for e in self.repository.serving() if e.name == name]

    # ------------------------------------------------------------------ memory
    def check_echo(self, what: str, value: str | bytes) -> int:
        """The bytes of a caller's id that the answer echoes; INVALID_ARGUMENT over ``MAX_ECHO_BYTES``."""
        size = len(value.encode() if isinstance(value, str) else value)
        if size > MAX_ECHO_BYTES:
            raise invalid(f"{what} is {size:,} bytes; the limit is {MAX_ECHO_BYTES:,} (send a shorter id)")
        return size

    def reserve(self, model: LoadedModel, *, images: int, request_bytes: int, echo_bytes: int = 0,
                layers: tuple[str, ...] = (), itemsize: int = 4,
                advice: str = "send fewer images per request") -> Reservation:
        """Reserves what a classification holds until its answer is written: the request (gRPC's
        bytes and the parsed message), its decoded images, its answer and the id the answer echoes
        (``check_echo``); RESOURCE_EXHAUSTED at once when that does not fit."""
        per_layer = layer_elements(model.metadata)
        elements = sum(per_layer[name] for name in layers)
        nbytes = (2 * request_bytes + ECHO_COPIES * echo_bytes + images * math.prod(model.input_shape)
                  + answer_bytes(images, elements, len(layers), itemsize, len(model.class_names)))
        return Lease(self.repository.entry(model), self._reserve(nbytes, model.name, bool(layers), advice), images)

    def reserve_explanation(self, model: LoadedModel, *, images: int, request_bytes: int,
                            echo_bytes: int = 0, value_bytes: int = 4) -> Reservation:
        """As ``reserve``, for an explanation: two maps the input's size per image, each value held
        in ``value_bytes`` (more than float32's 4 when the answer is JSON text)."""
        h, w = model.input_shape[1:]
        nbytes = (2 * request_bytes + ECHO_COPIES * echo_bytes + images * math.prod(model.input_shape)
                  + explanation_bytes(images, h * w, value_bytes))
        return Lease(self.repository.entry(model), self._reserve(nbytes, model.name, True,
                                                                 "explain fewer images per request"), 0)

    def reserve_refusal(self, model_label: str, message: str, echo_bytes: int) -> Reservation:
        """A refusal answered inside a stream (its message and echoed id), held until written like
        any answer: a stream whose client reads nothing cannot pile refusals up outside the budget."""
        return self._reserve(refusal_bytes(len(message), echo_bytes), model_label, False, "read the stream's answers")

    def _reserve(self, nbytes: int, model: str, features: bool, advice: str) -> Reservation:
        try:
            return self.budget.reserve(nbytes, features=features, model=model, advice=advice)
        except OverBudget as exc:
            raise Rejection(Code.RESOURCE_EXHAUSTED, str(exc)) from None

    # ------------------------------------------------------------------ decoding
    async def decode(self, model: LoadedModel, images: Sequence[Source], resize: Resize,
                     deadline: float | None) -> np.ndarray:
        """The images as the model's input, n x C x H x W uint8: small raw tensors here (a copy
        bounded by the request's size), the rest on the fair, abandonable decode lanes."""
        try:
            if _small_raw_only(images, model):  # microseconds: cheaper than a hop to a decode thread
                start = time.perf_counter()
                out = np.empty((len(images), *model.input_shape), dtype=np.uint8)
                for i, image in enumerate(images):
                    decode_into(image, i, out[i], resize, self.config.max_image_pixels)
                self.metrics.preprocess_seconds.labels(model.name).observe(time.perf_counter() - start)
                return out
            return await self.decoder.decode(images, model.name, model.input_shape, resize, deadline)
        except ImageError as exc:
            raise invalid(str(exc)) from None
        except DecodeExpired as exc:
            raise Rejection(Code.DEADLINE_EXCEEDED, str(exc)) from None

    def tensor(self, model: LoadedModel, array: np.ndarray, what: str) -> np.ndarray:
        """A batch already in the model's layout (n x C x H x W, uint8 or float32 in [0, 1]) as its
        input; ``what`` names the tensor in errors."""
        start = time.perf_counter()
        try:
            images = to_uint8(array, what)
        except ImageError as exc:
            raise invalid(str(exc)) from None
        if images is array and not array.flags.writeable:
            images = array.copy()  # a view of the request is read-only; the batcher's torch wants it writable
        self.metrics.preprocess_seconds.labels(model.name).observe(time.perf_counter() - start)
        return images

    # ------------------------------------------------------------------ inference
    async def infer(self, model: LoadedModel, images: np.ndarray, layers: tuple[str, ...],
                    deadline: float | None, lease: Lease | None = None) -> BatchResult:
        """Queues the images on the model's batcher: probabilities, and the feature maps of ``layers``.
        With the request's ``lease``, the version's statistics count it (success, or failure at release)."""
        if lease is not None:
            lease.track()
        try:
            result = await self.batcher(model).submit(images, layers, deadline)
        except BatchError as exc:
            raise rejection_for(exc, model.name) from None
        if lease is not None:
            lease.succeed()
        return result

    async def explain(self, model: LoadedModel, images: Sequence[Source], resize: Resize, layer: str,
                      target: int | None, deadline: float | None) -> Maps:
        """Saliency and Grad-CAM (``server.explain``): a place on the explanation path first
        (RESOURCE_EXHAUSTED at once when none is free), then decoding as ``decode`` does, then the
        path's thread."""
        with self.explainer.slot():
            pixels = await self.decode(model, images, resize, deadline)
            return await self.explainer.run(model, pixels, layer, target, deadline)

    async def filters(self, model: LoadedModel, layers: Sequence[str], itemsize: int,
                      request_bytes: int) -> tuple[list[LayerWeights], Reservation]:
        """The trained weights of ``layers`` (``server.filters``: empty or "*" for all, INVALID_ARGUMENT
        naming the layers with weights otherwise) and their answer's reservation, taken as for feature
        maps; RESOURCE_EXHAUSTED when they would not fit the budget or gRPC's largest answer."""
        names = filter_weights.plan(model, layers)
        store = await self.weights.get(model)
        chosen = [store[name] for name in names]
        advice = (f"ask for fewer layers (this asks for {len(names)})"
                  + ("" if itemsize <= 2 else ", or dtype FLOAT16"))
        wire_bytes = filter_weights.payload_bytes(chosen, itemsize)
        if wire_bytes > self.config.max_send_message_bytes:
            raise Rejection(Code.RESOURCE_EXHAUSTED, f"these weights are {wire_bytes:,} bytes, more than the "
                            f"{self.config.max_send_message_bytes:,} this server sends in one answer; {advice}")
        nbytes = filter_weights.answer_bytes(chosen, itemsize, request_bytes)
        return chosen, self._reserve(nbytes, model.name, True, advice)

    async def off_loop(self, fn: Callable[..., T], *args) -> T:
        """``fn(*args)`` on the encoding thread: for answers whose building would hold the loop."""
        return await asyncio.get_running_loop().run_in_executor(self._encode_pool, fn, *args)

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Loads the models the repository serves from the start (``--load-models``) and returns once
        the default model serves; the others serve one by one as they are warm (``repository.starting``),
        and the rest of every model's warm-up runs in the background."""
        self._warm_queue = asyncio.Queue()
        self._warmer = asyncio.get_running_loop().create_task(self._warm_rest(), name="background-warm-up")
        names = [n for n in self.config.load_models.split(",") if n] if self.config.load_models != "*" else None
        await self.repository.start(names, self.default_model, self._share_threads)
        self._serving = True  # from here on, warm-ups yield to serving passes
        if self.config.model_control_mode != "explicit" or names is None or self.default_model in names:
            try:  # the default must serve, unless explicit mode leaves it out on purpose
                self.repository.lookup(self.default_model)
            except Rejection:
                raise ModelLoadError(f"default model {self.default_model!r} is not among the loaded: "
                                     f"{sorted(self.repository.serving_names())}") from None
        if self.config.model_control_mode == "poll":
            self._poller = asyncio.get_running_loop().create_task(
                self.repository.poll_forever(self.config.repository_poll_seconds), name="repository-poll")

    async def stop(self) -> None:
        for task in (getattr(self, "_poller", None), getattr(self, "_warmer", None)):
            if task is not None:
                task.cancel()
        await self.repository.stop()
        self._encode_pool.shutdown(wait=False)

    def _share_threads(self, models: int) -> None:
        """One ``ThreadShares`` for the process: every model's passes share it, each pass an equal
        share over the instances of the ``models`` loaded at start (one loaded later shares the same way)."""
        self.shares = ThreadShares(self.threads, self.instances * max(1, models), wide_from(self.config.compute_nice))

    async def _load(self, file: FileVersion, entry: Version) -> None:
        """The repository's loader: checks, loads and warms one version beside what serves."""
        loop = asyncio.get_running_loop()
        runners = self.instances + 1 if self.config.compiled_min_batch else 0  # + the background warmer

        def agrees(metadata: dict) -> None:
            """The file names the model and version the scan found, checked before any of its code
            runs: a file under the wrong folders is refused without loading its TorchScript."""
            named = (metadata["name"], metadata["version"])
            if named == (file.name, file.version):
                return
            if file.path.name == TRITON_FILE:
                raise ModelLoadError(f"{file.path}: its metadata names model {named[0]!r} version {named[1]!r}, "
                                     f"the folders {file.name!r} version {file.version!r}")
            # A NAME.pt is named by the metadata the scan read: it was replaced since.
            raise ModelLoadError(f"{file.path}: the file changed while it was read; it is read again next time")

        model = await loop.run_in_executor(None, functools.partial(
            load_artifact, file.path, self.device, True, runners, check_metadata=agrees))
        for validate in self.validators:
            validate(model)
        entry.model = model
        entry.batcher = Batcher(model, self.metrics, self.config.max_batch_size, self.config.max_queue_delay_us,
                                self.config.max_queue_images, self.instances, self.shares, self.config.compute_nice,
                                statistics=entry.statistics,
                                compiled_min_batch=(self.config.compiled_min_batch, self.config.compiled_min_batch_wide))
        if model.compiled is not None:
            log.info("model %s version %s: %s runs its passes of %d to %d images (%d+ on more than one thread)",
                     model.name, model.version, model.compiled.path.name, self.config.compiled_min_batch,
                     min(model.compiled.max_batch, self.config.max_batch_size), self.config.compiled_min_batch_wide)

    async def _warm(self, entry: Version) -> None:
        """The repository's warmer: the first rungs before the version serves, the rest queued for
        the background. The first passes pay for allocation and kernel selection. Before SERVING (the
        default model at start) they run on the model's own threads; once anything serves, on a
        thread that yields to every serving one."""
        loop = asyncio.get_running_loop()
        batcher = entry.batcher
        try:
            for _ in range(self.config.warmup_batches):  # one round at a time: a signal waits for one only
                if self._serving:
                    await loop.run_in_executor(None, batcher.warm_up_background, False)
                else:
                    await loop.run_in_executor(None, batcher.warm_up, 1)
        except Exception as exc:  # out of memory, say: this version does not serve, the others do
            await batcher.stop()
            raise ModelLoadError(f"{entry.path}: warm-up failed: {exc}") from exc
        batcher.start()
        if self.config.warmup_batches > 0:
            self._warm_queue.put_nowait(batcher)
        if self._serving:  # before SERVING, start-up's settle_heap (server.main) does this once for all
            # What start-up does once for the heap, kept true for what this load left.
            gc.collect()
            gc.freeze()

    async def _warm_rest(self) -> None:
        """The rest of each model's warm-up, one model at a time, on a thread below the serving ones."""
        loop = asyncio.get_running_loop()
        while True:
            batcher = await self._warm_queue.get()
            if not batcher.closing:
                await loop.run_in_executor(None, batcher.warm_up_background)

    def _changed(self, entry: Version, event: str) -> None:
        """The repository's hook: metrics follow each version's state and count loads and unloads."""
        m = self.metrics
        if event not in ("replaced", "failed beside"):  # those leave the version's listed state as it is
            m.set_state(entry.name, entry.version, entry.state)
        if event == "loaded":
            m.model_loads.labels(entry.name, "loaded").inc()
            m.model_load_seconds.labels(entry.name).observe(entry.load_seconds)
            pooling = entry.model.metadata.get("pooling", {})
            m.add_model(entry.name, {"version": entry.version, "pooling": str(pooling.get("kind", "")),
                                     "pool_window": str(pooling.get("window", "")), "device": str(self.device)})
        elif event in ("failed", "failed beside"):
            m.model_loads.labels(entry.name, "failed").inc()
        elif event in ("unloaded", "replaced"):
            m.model_loads.labels(entry.name, "unloaded").inc()
            # What was read from its file for explanations and filters goes with it (a replaced
            # version's file changed, so the copies of the same version are stale too).
            self.explainer.forget(entry.name, entry.version)
            self.weights.forget(entry.name, entry.version)


def top_k(probabilities: np.ndarray, k: int) -> np.ndarray:
    """The k best classes of each row, best first; ties in class index order (a stable sort), so
    both APIs rank equal scores the same way."""
    return np.argsort(-probabilities, axis=1, kind="stable")[:, :k]


def _small_raw_only(images: Sequence[Source], model: LoadedModel) -> bool:
    """Whether every image is a raw tensor no bigger than the model's input: then decoding is a copy
    whose cost is bounded by the request's size, and it stays on the event loop."""
    c, h, w = model.input_shape
    limit = 4 * c * h * w  # float32 at the model's size
    return all(isinstance(image, Raw) and len(image.data) <= limit for image in images)
