"""The Classifier gRPC service: validate, decode, queue, batch, infer, postprocess, respond.

Every bad input maps to one status code with a message a caller can act on; a bad request fails
alone and the server keeps serving.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
import numpy as np

from cifar10_serving.protos.cifar10.v1 import classifier_pb2 as pb
from cifar10_serving.protos.cifar10.v1 import classifier_pb2_grpc as pb_grpc
from cifar10_serving.server.batching import Batcher, BatchError, BatchResult
from cifar10_serving.server.calls import Call, Rejection, deadline_of, model_label, rejection_for
from cifar10_serving.server.config import ServerConfig
from cifar10_serving.server.imaging import ImageError, decode_into, enum_name
from cifar10_serving.server.metrics import Metrics
from cifar10_serving.server.models import LoadedModel
from cifar10_serving.server.modelinfo import model_info

ALL_LAYERS = "*"
DEFAULT_TOP_K = 5
STREAM_WINDOW = 64  # stream requests in progress at once; bounds a stream's memory, keeps answers in order
# Decoding runs off the event loop: a small PNG may declare millions of pixels, and a request of
# them would otherwise stall every call, health checks included (README, "Reliability"). Two
# threads, so one such request cannot hold up all decoding.
DECODE_THREADS = 2
RESIZE_MODES = frozenset(pb.ResizeMode.values())
FEATURE_DTYPES = {pb.DTYPE_UNSPECIFIED: ("<f4", pb.DTYPE_FLOAT32), pb.DTYPE_FLOAT32: ("<f4", pb.DTYPE_FLOAT32),
                  pb.DTYPE_FLOAT16: ("<f2", pb.DTYPE_FLOAT16)}


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
        deadline = deadline_of(context)
        try:
            with Call(self.metrics, "Classify", self._model_label(request.model), len(request.images),
                      deadline=deadline, in_flight=True):
                return await self._classify(request, deadline)
        except Rejection as rejection:
            await context.abort(rejection.code, rejection.message)

    async def ClassifyStream(self, request_iterator, context: grpc.aio.ServicerContext):
        deadline = deadline_of(context)
        pending: asyncio.Queue[asyncio.Task | None] = asyncio.Queue(STREAM_WINDOW)

        async def read() -> None:
            try:
                async for request in request_iterator:
                    await pending.put(asyncio.ensure_future(self._stream_one(request, deadline)))
            finally:
                await pending.put(None)

        reader = asyncio.ensure_future(read())
        in_flight = self.metrics.in_flight.labels("ClassifyStream")  # counts the stream; its requests have Calls
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
        try:
            with Call(self.metrics, "ListModels", ""):  # names no model: the empty label
                return pb.ListModelsResponse(models=[self._info(m) for m in self.models.values()],
                                             default_model=self.config.default_model)
        except Rejection as rejection:
            await context.abort(rejection.code, rejection.message)

    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context) -> pb.ModelInfo:
        try:
            with Call(self.metrics, "GetModelInfo", self._model_label(request.name)):
                return self._info(self._resolve(request.name))
        except Rejection as rejection:
            await context.abort(rejection.code, rejection.message)

    # ------------------------------------------------------------------ the serving path
    async def _classify(self, request: pb.ClassifyRequest, deadline: float | None) -> pb.ClassifyResponse:
        plan = self._plan(request)
        if _small_raw_only(request, plan.model):
            images = self._decode(request, plan.model)  # microseconds: cheaper than a hop to a decode thread
        else:
            images = await asyncio.get_running_loop().run_in_executor(self._decode_pool, self._decode, request,
                                                                      plan.model)
        try:
            result = await self.batchers[plan.model.name].submit(images, plan.layers, deadline)
        except BatchError as exc:
            raise rejection_for(exc, plan.model.name) from None
        return self._respond(request, plan, result)

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
        """One request of a stream: a refusal is this request's answer, and the stream goes on."""
        try:
            with Call(self.metrics, "ClassifyStream", self._model_label(request.model), len(request.images),
                      deadline=deadline):
                return await self._classify(request, deadline)
        except Rejection as rejection:
            return pb.ClassifyResponse(request_id=request.request_id,
                                       error=pb.Error(code=rejection.code.value[0], message=rejection.message))

    # ------------------------------------------------------------------ helpers
    def _resolve(self, name: str) -> LoadedModel:
        model = self.models.get(name or self.config.default_model)
        if model is None:
            raise Rejection(grpc.StatusCode.NOT_FOUND,
                            f"model {_quote(name)} is not loaded; loaded models: {', '.join(sorted(self.models))}")
        return model

    def _model_label(self, name: str) -> str:
        return model_label(name or self.config.default_model, self.models)

    def _info(self, model: LoadedModel) -> pb.ModelInfo:
        return model_info(model, is_default=model.name == self.config.default_model)


def _quote(name: str, limit: int = 80) -> str:
    """A caller's string, quoted and cut short: the message travels in trailers, which gRPC caps at
    16 KiB; past that the caller gets RESOURCE_EXHAUSTED "Stream removed" instead of its error."""
    return repr(name if len(name) <= limit else name[: limit - 3] + "...")


def _small_raw_only(request: pb.ClassifyRequest, model: LoadedModel) -> bool:
    """Whether every image is a raw tensor no bigger than the model's input: then decoding is a copy
    whose cost is bounded by the request's size, and it stays on the event loop."""
    c, h, w = model.input_shape
    limit = 4 * c * h * w  # float32 at the model's size
    return all(image.WhichOneof("data") == "raw" and len(image.raw.data) <= limit for image in request.images)

