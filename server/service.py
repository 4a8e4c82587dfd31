"""The Classifier gRPC service: validate, decode, queue, batch, infer, postprocess, respond.

Every bad input maps to one status code with a message a caller can act on; a bad request fails
alone and the server keeps serving.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
import numpy as np

from cifar10_serving.protos.cifar10.v1 import classifier_pb2 as pb
from cifar10_serving.protos.cifar10.v1 import classifier_pb2_grpc as pb_grpc
from cifar10_serving.server.batching import Batcher, BatchResult, DeadlineExpired, ModelFailure, QueueFull
from cifar10_serving.server.config import ServerConfig
from cifar10_serving.server.imaging import ImageError, decode_into, enum_name
from cifar10_serving.server.metrics import UNKNOWN_MODEL, Metrics
from cifar10_serving.server.models import LoadedModel
from cifar10_serving.server.modelinfo import model_info

log = logging.getLogger(__name__)

ALL_LAYERS = "*"
DEFAULT_TOP_K = 5
DEADLINE_SLACK_SECONDS = 0.05  # a cancellation this close to the deadline is the deadline, seen from the caller
STREAM_WINDOW = 64  # stream requests in progress at once; bounds a stream's memory, keeps answers in order
# Decoding runs off the event loop: a 16-megapixel PNG of zeros is 50 KB on the wire and ~0.5 s of
# decoding, and a request of 64 of them would otherwise stall every call, health checks included.
# Two threads, so one such request cannot hold up all decoding.
DECODE_THREADS = 2
RESIZE_MODES = frozenset(pb.ResizeMode.values())
FEATURE_DTYPES = {pb.DTYPE_UNSPECIFIED: ("<f4", pb.DTYPE_FLOAT32), pb.DTYPE_FLOAT32: ("<f4", pb.DTYPE_FLOAT32),
                  pb.DTYPE_FLOAT16: ("<f2", pb.DTYPE_FLOAT16)}


class Rejection(Exception):
    """A request the service refuses, with the status code and message the caller gets."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Plan:
    """A validated request: which model, which options."""

    model: LoadedModel
    top_k: int
    layers: tuple[str, ...]
    feature_dtype: tuple[str, int]


class ClassifierService(pb_grpc.ClassifierServicer):
    def __init__(self, config: ServerConfig, models: dict[str, LoadedModel], batchers: dict[str, Batcher],
                 metrics: Metrics) -> None:
        self.config = config
        self.models = models
        self.batchers = batchers
        self.metrics = metrics
        self._decode_pool = ThreadPoolExecutor(DECODE_THREADS, thread_name_prefix="decode")

    # ------------------------------------------------------------------ rpcs
    async def Classify(self, request: pb.ClassifyRequest, context: grpc.aio.ServicerContext) -> pb.ClassifyResponse:
        start = time.perf_counter()
        label, code = self._model_label(request.model), grpc.StatusCode.OK
        in_flight = self.metrics.in_flight.labels("Classify")
        in_flight.inc()
        try:
            return await self._classify(request, _deadline(context))
        except Rejection as rejection:
            code = rejection.code
            await context.abort(rejection.code, rejection.message)
        except asyncio.CancelledError:
            code = _cancelled_code(context.time_remaining())
            raise
        except Exception:
            code = grpc.StatusCode.INTERNAL
            log.exception("Classify failed")
            await context.abort(grpc.StatusCode.INTERNAL, "internal error; see the server log")
        finally:
            in_flight.dec()
            self._observe("Classify", label, code, time.perf_counter() - start, len(request.images))

    async def ClassifyStream(self, request_iterator, context: grpc.aio.ServicerContext):
        deadline = _deadline(context)
        pending: asyncio.Queue[asyncio.Task | None] = asyncio.Queue(STREAM_WINDOW)

        async def read() -> None:
            try:
                async for request in request_iterator:
                    await pending.put(asyncio.ensure_future(self._stream_one(request, deadline)))
            finally:
                await pending.put(None)

        reader = asyncio.ensure_future(read())
        in_flight = self.metrics.in_flight.labels("ClassifyStream")
        in_flight.inc()
        try:
            while (task := await pending.get()) is not None:
                yield await task
            await reader  # surfaces a broken request stream
        finally:
            in_flight.dec()
            reader.cancel()
            while not pending.empty():
                task = pending.get_nowait()
                if task is not None:
                    task.cancel()

    async def ListModels(self, request: pb.ListModelsRequest, context) -> pb.ListModelsResponse:
        start = time.perf_counter()
        response = pb.ListModelsResponse(
            models=[self._info(m) for m in self.models.values()], default_model=self.config.default_model)
        self._observe("ListModels", "", grpc.StatusCode.OK, time.perf_counter() - start)
        return response

    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context) -> pb.ModelInfo:
        start = time.perf_counter()
        label, code = self._model_label(request.name), grpc.StatusCode.OK
        try:
            return self._info(self._resolve(request.name))
        except Rejection as rejection:
            code = rejection.code
            await context.abort(rejection.code, rejection.message)
        finally:
            self._observe("GetModelInfo", label, code, time.perf_counter() - start)

    # ------------------------------------------------------------------ the serving path
    async def _classify(self, request: pb.ClassifyRequest, deadline: float | None) -> pb.ClassifyResponse:
        plan = self._plan(request)
        if _small_raw_only(request, plan.model):
            images = self._decode(request, plan.model)  # microseconds: cheaper than a hop to a decode thread
        else:
            images = await asyncio.get_running_loop().run_in_executor(self._decode_pool, self._decode, request,
                                                                      plan.model)
        result = await self._submit(plan.model, images, plan.layers, deadline)
        return self._respond(request, plan, result)

    async def _submit(self, model: LoadedModel, images: np.ndarray, layers: tuple[str, ...],
                      deadline: float | None) -> BatchResult:
        """Queues decoded images on the model's batcher; its refusals become the caller's status.
        (Shared with the Open Inference Protocol's ModelInfer, server.inference.)"""
        try:
            return await self.batchers[model.name].submit(images, layers, deadline)
        except QueueFull as exc:
            raise Rejection(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)) from None
        except DeadlineExpired as exc:
            raise Rejection(grpc.StatusCode.DEADLINE_EXCEEDED, str(exc)) from None
        except ModelFailure as exc:
            code = grpc.StatusCode.RESOURCE_EXHAUSTED if exc.out_of_memory else grpc.StatusCode.INTERNAL
            raise Rejection(code, f"model {model.name!r} failed on this batch: {_summary(str(exc))}") from None

    def _plan(self, request: pb.ClassifyRequest) -> Plan:
        model = self._resolve(request.model)
        n = len(request.images)
        if n == 0:
            raise Rejection(grpc.StatusCode.INVALID_ARGUMENT,
                            f"no images in the request; send 1 to {self.config.max_batch_size}")
        if n > self.config.max_batch_size:
            raise Rejection(grpc.StatusCode.INVALID_ARGUMENT,
                            f"{n} images in one request; the limit is {self.config.max_batch_size}, split the batch")
        classes = len(model.class_names)
        top_k = request.top_k or min(DEFAULT_TOP_K, classes)
        if top_k > classes:
            raise Rejection(grpc.StatusCode.INVALID_ARGUMENT, f"top_k is {top_k}; it must be 1 to {classes}")
        if request.resize not in RESIZE_MODES:
            raise Rejection(grpc.StatusCode.INVALID_ARGUMENT, f"unknown resize mode {request.resize}")
        dtype = FEATURE_DTYPES.get(request.feature_dtype)
        if dtype is None:
            raise Rejection(grpc.StatusCode.INVALID_ARGUMENT,
                            f"feature_dtype {enum_name(pb.DType, request.feature_dtype)} not offered; use FLOAT32 or FLOAT16")
        return Plan(model, top_k, self._layers(model, request.feature_layers), dtype)

    def _layers(self, model: LoadedModel, names) -> tuple[str, ...]:
        if not names:
            return ()
        names = list(names)
        if ALL_LAYERS in names:
            if len(names) > 1:
                raise Rejection(grpc.StatusCode.INVALID_ARGUMENT, f"{ALL_LAYERS!r} asks for all layers; send it alone")
            return tuple(model.layer_names)
        seen = set()
        for name in names:
            if name in seen:
                raise Rejection(grpc.StatusCode.INVALID_ARGUMENT, f"layer {_quote(name)} asked for twice")
            seen.add(name)
            if name not in model.layer_names:
                raise Rejection(grpc.StatusCode.INVALID_ARGUMENT, f"model {model.name!r} has no layer {_quote(name)}; "
                                f"its layers: {', '.join(model.layer_names)}")
        order = {name: i for i, name in enumerate(model.layer_names)}
        return tuple(sorted(names, key=order.__getitem__))

    def _decode(self, request: pb.ClassifyRequest, model: LoadedModel) -> np.ndarray:
        start = time.perf_counter()
        images = np.empty((len(request.images), *model.input_shape), dtype=np.uint8)
        try:
            for i, image in enumerate(request.images):
                decode_into(image, i, images[i], request.resize, self.config.max_image_pixels)
        except ImageError as exc:
            raise Rejection(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        self.metrics.preprocess_seconds.labels(model.name).observe(time.perf_counter() - start)
        return images

    def _respond(self, request: pb.ClassifyRequest, plan: Plan, result: BatchResult) -> pb.ClassifyResponse:
        model = plan.model
        byte_order, dtype_enum = plan.feature_dtype
        order = np.argsort(-result.probabilities, axis=1, kind="stable")[:, : plan.top_k]
        results = []
        for i, probs in enumerate(result.probabilities):
            top = [pb.Prediction(label=model.class_names[j], index=int(j), probability=float(probs[j])) for j in order[i]]
            maps = [pb.FeatureMap(layer=name, shape=result.features[name][i].shape, dtype=dtype_enum,
                                  data=result.features[name][i].astype(byte_order).tobytes())
                    for name in plan.layers]
            results.append(pb.Result(probabilities=probs.tolist(), top_k=top, feature_maps=maps))
        return pb.ClassifyResponse(request_id=request.request_id, model=model.name, model_version=model.version,
                                   results=results)

    async def _stream_one(self, request: pb.ClassifyRequest, deadline: float | None) -> pb.ClassifyResponse:
        start = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            return await self._classify(request, deadline)
        except asyncio.CancelledError:  # the stream ended under this request: cancelled, or its deadline passed
            code = _cancelled_code(None if deadline is None else deadline - time.monotonic())
            raise
        except Rejection as rejection:
            code = rejection.code
            return pb.ClassifyResponse(request_id=request.request_id,
                                       error=pb.Error(code=rejection.code.value[0], message=rejection.message))
        except Exception:
            code = grpc.StatusCode.INTERNAL
            log.exception("ClassifyStream request failed")
            return pb.ClassifyResponse(request_id=request.request_id,
                                       error=pb.Error(code=code.value[0], message="internal error; see the server log"))
        finally:
            self._observe("ClassifyStream", self._model_label(request.model), code, time.perf_counter() - start,
                          len(request.images))

    # ------------------------------------------------------------------ helpers
    def _resolve(self, name: str) -> LoadedModel:
        model = self.models.get(name or self.config.default_model)
        if model is None:
            raise Rejection(grpc.StatusCode.NOT_FOUND,
                            f"model {_quote(name)} is not loaded; loaded models: {', '.join(sorted(self.models))}")
        return model

    def _model_label(self, name: str) -> str:
        name = name or self.config.default_model
        return name if name in self.models else UNKNOWN_MODEL

    def _info(self, model: LoadedModel) -> pb.ModelInfo:
        return model_info(model, is_default=model.name == self.config.default_model)

    def _observe(self, method: str, model: str, code: grpc.StatusCode, seconds: float, images: int = 0) -> None:
        self.metrics.request_seconds.labels(method, model, code.name).observe(seconds)
        self.metrics.requests.labels(method, model, code.name).inc()
        if images:
            outcome = "ok" if code == grpc.StatusCode.OK else code.name
            self.metrics.images.labels(model, outcome).inc(images)


def _cancelled_code(remaining: float | None) -> grpc.StatusCode:
    """What the caller of a cancelled handler saw, given the seconds left before its deadline.

    A caller's deadline can reach the server as a cancellation just before the server's copy of the
    deadline (which started when the request arrived) runs out, hence the slack.
    """
    expired = remaining is not None and remaining <= DEADLINE_SLACK_SECONDS
    return grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED


def _quote(name: str, limit: int = 80) -> str:
    """A caller's string, quoted and cut short: the message travels in trailers, which gRPC caps at
    16 KiB; past that the caller gets RESOURCE_EXHAUSTED "Stream removed" instead of its error."""
    return repr(name if len(name) <= limit else name[: limit - 3] + "...")


def _summary(text: str, limit: int = 300) -> str:
    """The last line of an error: a TorchScript error's is the exception, the lines above it code."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    line = lines[-1] if lines else "unknown error"
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _small_raw_only(request: pb.ClassifyRequest, model: LoadedModel) -> bool:
    """Whether every image is a raw tensor no bigger than the model's input: then decoding is a copy
    whose cost is bounded by the request's size, and it stays on the event loop."""
    c, h, w = model.input_shape
    limit = 4 * c * h * w  # float32 at the model's size
    return all(image.WhichOneof("data") == "raw" and len(image.raw.data) <= limit for image in request.images)


def _deadline(context: grpc.aio.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining
