"""The Classifier gRPC service: validate, reserve, decode, queue, batch, infer, postprocess, respond.

Every bad input maps to one status code with a message a caller can act on; a bad request fails
alone and the server keeps serving. Each request reserves the memory its answer will hold from the
server's answer budget (``server.answer_budget``) before any work, and gives it back once the answer has
been written or the call has ended, so answers nobody reads cannot grow the server without bound.
"""

from __future__ import annotations

import asyncio
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
import numpy as np

from cifar10_serving.protos.cifar10.v1 import classifier_pb2 as pb
from cifar10_serving.protos.cifar10.v1 import classifier_pb2_grpc as pb_grpc
from cifar10_serving.server import wire
from cifar10_serving.server.batching import Batcher, BatchError, BatchResult
from cifar10_serving.server.answer_budget import (AnswerBudget, OverBudget, Reservation, answer_bytes, default_budget_bytes,
                                           layer_elements)
from cifar10_serving.server.calls import Call, Rejection, deadline_of, model_label, rejection_for
from cifar10_serving.server.config import ServerConfig
from cifar10_serving.server.decode_lanes import DecodeExpired, Decoder
from cifar10_serving.server.explain import Explainer
from cifar10_serving.server.images import ImageError, decode_into, enum_name
from cifar10_serving.server.metrics import Metrics
from cifar10_serving.server.models import LoadedModel
from cifar10_serving.server.modelinfo import model_info
from cifar10_serving.server.priority import lower_priority

ALL_LAYERS = "*"
DEFAULT_TOP_K = 5
# Stream requests in progress at once, which keeps answers in order; their bytes are bounded by the
# answer budget, which every request of every stream reserves from.
STREAM_WINDOW = 64
# Answers with feature maps are built on this thread, off the event loop (server.wire): tens of
# megabytes copied on the loop would hold every call's progress and health check with it. One
# thread: more would only compete with the loop for the GIL and the machine's memory bandwidth.
RESPOND_THREADS = 1
NO_RESERVATION = Reservation(None, 0)
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
        self.budget = AnswerBudget(config.answer_budget_bytes or default_budget_bytes(), metrics)
        self.decoder = Decoder(metrics, config.max_image_pixels, config.max_request_pixels, config.compute_nice)
        self._respond_pool = ThreadPoolExecutor(RESPOND_THREADS, thread_name_prefix="respond",
                                                initializer=lower_priority, initargs=(config.compute_nice,))
        self._elements = {name: layer_elements(model.metadata) for name, model in models.items()}
        self.explainer = Explainer(config, metrics, self._resolve, self._model_label)

    # ------------------------------------------------------------------ rpcs
    async def Classify(self, request: pb.ClassifyRequest,
                       context: grpc.aio.ServicerContext) -> pb.ClassifyResponse | bytes:
        deadline = deadline_of(context)
        try:
            with Call(self.metrics, "Classify", self._model_label(request.model), len(request.images),
                      deadline=deadline, in_flight=True):
                response, reservation = await self._classify(request, deadline)
        except Rejection as rejection:
            await context.abort(rejection.code, rejection.message)
        # The answer is held until gRPC has written it (within the client's flow-control window) or
        # the call has ended: grpc.aio runs done callbacks only after its last send completes.
        context.add_done_callback(lambda _context: reservation.release())
        return response

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
        reservation = NO_RESERVATION
        try:
            while (task := await pending.get()) is not None:
                response, reservation = await task
                yield response
                reservation.release()  # gRPC asks for the next answer only once this one is written
            await reader  # surfaces a broken request stream
        finally:
            reservation.release()  # the stream ended while its answer was being written
            in_flight.dec()
            reader.cancel()
            while not pending.empty():
                task = pending.get_nowait()
                if task is not None:
                    task.cancel()
                    task.add_done_callback(_release_result)  # an answer that was ready but never written

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

    async def Explain(self, request: pb.ExplainRequest, context) -> pb.ExplainResponse:
        return await self.explainer.Explain(request, context)  # a path of its own, apart from the batcher's

    # ------------------------------------------------------------------ the serving path
    async def _classify(self, request: pb.ClassifyRequest,
                        deadline: float | None) -> tuple[pb.ClassifyResponse | bytes, Reservation]:
        """The answer, and its reservation from the answer budget, which the caller releases once
        the answer is written (released here if anything fails)."""
        plan = self._plan(request)
        reservation = self._reserve(request, plan)
        try:
            images = await self._decode(request, plan, deadline)
            try:
                result = await self.batchers[plan.model.name].submit(images, plan.layers, deadline)
            except BatchError as exc:
                raise rejection_for(exc, plan.model.name) from None
            return await self._respond(request, plan, result), reservation
        except BaseException:
            reservation.release()
            raise

    def _reserve(self, request: pb.ClassifyRequest, plan: Plan) -> Reservation:
        itemsize = np.dtype(plan.feature_dtype[0]).itemsize
        if plan.layers:
            cheaper = "" if itemsize == 2 else ", feature_dtype=FLOAT16"
            advice = f"ask for fewer feature_layers (this asks for {len(plan.layers)}){cheaper}, or fewer images per request"
        else:
            advice = "send fewer images per request"
        return self.reserve(plan.model, len(request.images), request.ByteSize(), plan.layers, itemsize, advice)

    def reserve(self, model: LoadedModel, images: int, request_bytes: int, layers: tuple[str, ...], itemsize: int,
                advice: str) -> Reservation:
        """Reserves what a request (of either API) will hold: itself (gRPC's bytes and the parsed
        message), its decoded images and its answer; RESOURCE_EXHAUSTED at once when that does not fit."""
        elements = sum(self._elements[model.name][name] for name in layers)
        nbytes = (2 * request_bytes + images * math.prod(model.input_shape)
                  + answer_bytes(images, elements, len(layers), itemsize, len(model.class_names)))
        try:
            return self.budget.reserve(nbytes, features=bool(layers), model=model.name, advice=advice)
        except OverBudget as exc:
            raise Rejection(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)) from None

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

    async def _decode(self, request: pb.ClassifyRequest, plan: Plan, deadline: float | None) -> np.ndarray:
        """The request's images as the model's input; encoded and large ones on ``self.decoder``'s threads."""
        model = plan.model
        try:
            if _small_raw_only(request, model):  # microseconds: cheaper than a hop to a decode thread
                start = time.perf_counter()
                images = np.empty((len(request.images), *model.input_shape), dtype=np.uint8)
                for i, image in enumerate(request.images):
                    decode_into(image, i, images[i], request.resize, self.config.max_image_pixels)
                self.metrics.preprocess_seconds.labels(model.name).observe(time.perf_counter() - start)
                return images
            return await self.decoder.decode(request.images, model.name, model.input_shape, request.resize, deadline)
        except ImageError as exc:
            raise Rejection(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        except DecodeExpired as exc:
            raise Rejection(grpc.StatusCode.DEADLINE_EXCEEDED, str(exc)) from None

    async def _respond(self, request: pb.ClassifyRequest, plan: Plan,
                       result: BatchResult) -> pb.ClassifyResponse | bytes:
        """The answer. With feature maps, a ClassifyResponse's wire bytes built on a thread
        (``server.wire``), which gRPC sends as they are; without, the message."""
        if not plan.layers:
            return self._build(request, plan, result)  # a few small messages: cheaper here than a hop
        return await asyncio.get_running_loop().run_in_executor(self._respond_pool, self._encode, request, plan, result)

    def _encode(self, request: pb.ClassifyRequest, plan: Plan, result: BatchResult) -> bytes:
        model = plan.model
        byte_order, dtype_enum = plan.feature_dtype
        order = np.argsort(-result.probabilities, axis=1, kind="stable")[:, : plan.top_k]
        maps = {name: np.ascontiguousarray(result.features[name], dtype=byte_order) for name in plan.layers}
        return wire.encode_response(request.request_id, model.name, model.version, model.class_names,
                                       result.probabilities, order, maps, dtype_enum)

    def _build(self, request: pb.ClassifyRequest, plan: Plan, result: BatchResult) -> pb.ClassifyResponse:
        """An answer without feature maps."""
        model = plan.model
        order = np.argsort(-result.probabilities, axis=1, kind="stable")[:, : plan.top_k]
        results = [pb.Result(probabilities=probs.tolist(), top_k=[
            pb.Prediction(label=model.class_names[j], index=int(j), probability=float(probs[j])) for j in order[i]])
            for i, probs in enumerate(result.probabilities)]
        return pb.ClassifyResponse(request_id=request.request_id, model=model.name, model_version=model.version,
                                   results=results)

    async def _stream_one(self, request: pb.ClassifyRequest,
                          deadline: float | None) -> tuple[pb.ClassifyResponse | bytes, Reservation]:
        """One request of a stream: a refusal is this request's answer, and the stream goes on."""
        try:
            with Call(self.metrics, "ClassifyStream", self._model_label(request.model), len(request.images),
                      deadline=deadline):
                return await self._classify(request, deadline)
        except Rejection as rejection:
            return pb.ClassifyResponse(request_id=request.request_id,
                                       error=pb.Error(code=rejection.code.value[0], message=rejection.message)), \
                NO_RESERVATION

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


def _release_result(task: asyncio.Task) -> None:
    """Gives back the reservation of a stream request's answer that was never written."""
    if not task.cancelled() and task.exception() is None:
        task.result()[1].release()


def _small_raw_only(request: pb.ClassifyRequest, model: LoadedModel) -> bool:
    """Whether every image is a raw tensor no bigger than the model's input: then decoding is a copy
    whose cost is bounded by the request's size, and it stays on the event loop."""
    c, h, w = model.input_shape
    limit = 4 * c * h * w  # float32 at the model's size
    return all(image.WhichOneof("data") == "raw" and len(image.raw.data) <= limit for image in request.images)

