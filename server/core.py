"""The serving core: what every API shares, in no API's words.

``ServingCore`` owns the model set and its lookup by name and version, the answer budget
(``server.answer_budget``), decoding (``server.images`` on the fair lanes of ``server.decode_lanes``),
the batchers (``server.batching``), the thread that encodes large answers off the event loop, and
the explanation path (``server.explain``). A request's path through it reads in order::

    model = core.model(name, version)        # NOT_FOUND names what is loaded
    reservation = core.reserve(model, ...)   # RESOURCE_EXHAUSTED before any work
    images = await core.decode(model, sources, resize, deadline)
    result = await core.infer(model, images, layers, deadline)
    answer = await core.off_loop(encode, ...)  # when the answer is large

Front-ends (``server.cifar10_v1``, ``server.open_inference``) translate their protocol's messages
into these calls and the results back; the core imports no protocol (tests/test_imports.py). Every
refusal is a ``server.errors.Rejection``. Used from the event loop's thread.
"""

from __future__ import annotations

import asyncio
import math
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence, TypeVar

import numpy as np

from cifar10_serving.server.answer_budget import (ECHO_COPIES, AnswerBudget, OverBudget, Reservation, answer_bytes,
                                                  default_budget_bytes, explanation_bytes, layer_elements,
                                                  refusal_bytes)
from cifar10_serving.server.batching import Batcher, BatchError, BatchResult
from cifar10_serving.server.calls import model_label
from cifar10_serving.server.config import ServerConfig
from cifar10_serving.server.decode_lanes import DecodeExpired, Decoder
from cifar10_serving.server.errors import Code, Rejection, invalid, quote, rejection_for
from cifar10_serving.server.explain import Explainer, Maps
from cifar10_serving.server.images import ImageError, Raw, Resize, Source, decode_into, to_uint8
from cifar10_serving.server.metrics import Metrics
from cifar10_serving.server.models import LoadedModel
from cifar10_serving.server.priority import lower_priority

T = TypeVar("T")

# Answers with feature maps are built on this thread, off the event loop (server.wire): tens of
# megabytes copied on the loop would hold every call's progress and health check with it. One
# thread: more would only compete with the loop for the GIL and the machine's memory bandwidth.
ENCODE_THREADS = 1
# The longest request id (cifar10.v1 ``request_id``, the Open Inference Protocol's ``id``) echoed in
# answers: a UUID is 36 bytes, a W3C traceparent 55. Longer ids are refused rather than held in
# every answer, stream refusal and log line.
MAX_ECHO_BYTES = 1024


class ServingCore:
    def __init__(self, config: ServerConfig, models: dict[str, LoadedModel], batchers: dict[str, Batcher],
                 metrics: Metrics, *, explainer: Explainer | None = None) -> None:
        self.config = config
        self.metrics = metrics
        self.batchers = batchers
        self._models = dict(models)
        self._elements = {name: layer_elements(model.metadata) for name, model in models.items()}
        self.budget = AnswerBudget(config.answer_budget_bytes or default_budget_bytes(), metrics)
        self.decoder = Decoder(metrics, config.max_image_pixels, config.max_request_pixels, config.compute_nice)
        self.explainer = explainer or Explainer(config.compute_nice)
        self._encode_pool = ThreadPoolExecutor(ENCODE_THREADS, thread_name_prefix="encode",
                                               initializer=lower_priority, initargs=(config.compute_nice,))

    # ------------------------------------------------------------------ the model set
    @property
    def default_model(self) -> str:
        return self.config.default_model

    def models(self) -> list[LoadedModel]:
        """The models served now, by name."""
        return [self._models[name] for name in sorted(self._models)]

    def model(self, name: str, version: str = "") -> LoadedModel:
        """The model a request names ("" for the default), at ``version`` if it names one."""
        model = self._models.get(name or self.config.default_model)
        if model is None:
            raise Rejection(Code.NOT_FOUND, f"model {quote(name)} is not loaded; loaded models: "
                                            f"{', '.join(sorted(self._models))}")
        if version and version != model.version:
            raise Rejection(Code.NOT_FOUND, f"model {model.name!r} is loaded at version {model.version!r}, "
                                            f"not {quote(version)}; send that version or none")
        return model

    def label(self, name: str) -> str:
        """The metrics' model label for a request naming ``name``: a loaded model's name, else "unknown"."""
        return model_label(name or self.config.default_model, self._models)

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
        elements = sum(self._elements[model.name][name] for name in layers)
        nbytes = (2 * request_bytes + ECHO_COPIES * echo_bytes + images * math.prod(model.input_shape)
                  + answer_bytes(images, elements, len(layers), itemsize, len(model.class_names)))
        return self._reserve(nbytes, model.name, bool(layers), advice)

    def reserve_explanation(self, model: LoadedModel, *, images: int, request_bytes: int,
                            echo_bytes: int = 0) -> Reservation:
        """As ``reserve``, for an explanation: two maps the input's size per image."""
        h, w = model.input_shape[1:]
        nbytes = (2 * request_bytes + ECHO_COPIES * echo_bytes + images * math.prod(model.input_shape)
                  + explanation_bytes(images, h * w))
        return self._reserve(nbytes, model.name, True, "explain fewer images per request")

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
                    deadline: float | None) -> BatchResult:
        """Queues the images on the model's batcher: probabilities, and the feature maps of ``layers``."""
        try:
            return await self.batchers[model.name].submit(images, layers, deadline)
        except BatchError as exc:
            raise rejection_for(exc, model.name) from None

    async def explain(self, model: LoadedModel, images: Sequence[Source], resize: Resize, layer: str,
                      target: int | None, deadline: float | None) -> Maps:
        """Saliency and Grad-CAM (``server.explain``): a place on the explanation path first
        (RESOURCE_EXHAUSTED at once when none is free), then decoding as ``decode`` does, then the
        path's thread."""
        with self.explainer.slot():
            pixels = await self.decode(model, images, resize, deadline)
            return await self.explainer.run(model, pixels, layer, target, deadline)

    async def off_loop(self, fn: Callable[..., T], *args) -> T:
        """``fn(*args)`` on the encoding thread: for answers whose building would hold the loop."""
        return await asyncio.get_running_loop().run_in_executor(self._encode_pool, fn, *args)

    # ------------------------------------------------------------------ lifecycle
    async def warm_up(self, rounds: int) -> None:
        """Each model's batch ladder, ``rounds`` times, then its batcher starts. One round at a time,
        so that a signal during warm-up (start-up is cancelled) waits for one round only."""
        loop = asyncio.get_running_loop()
        for batcher in self.batchers.values():
            for _ in range(rounds):
                await loop.run_in_executor(None, batcher.warm_up, 1)
            batcher.start()

    async def stop(self) -> None:
        for batcher in self.batchers.values():
            await batcher.stop()
        self._encode_pool.shutdown(wait=False)


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
