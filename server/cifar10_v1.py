"""The ``cifar10.v1.Classifier`` API: a thin translator between its messages and the serving core.

Each handler plans a request (which model, which options), turns its ``Image`` messages into the
core's image sources, and builds the answer from the core's result; every step in between (the
budget, decoding, batching, explanations) is the core's (``server.core``), and the handler skeleton
(deadline, bookkeeping, reservation, status) is ``server.grpc_handlers``'. Every bad input maps to
one status code with a message a caller can act on; a bad request fails alone.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass

import grpc
import numpy as np

from cifar10_serving.protos.cifar10.v1 import classifier_pb2 as pb
from cifar10_serving.protos.cifar10.v1 import classifier_pb2_grpc as pb_grpc
from cifar10_serving.server import wire
from cifar10_serving.server.answer_budget import Reservation
from cifar10_serving.server.batching import BatchResult
from cifar10_serving.server.calls import Call
from cifar10_serving.server.core import ServingCore, top_k
from cifar10_serving.server.errors import Rejection, invalid, listing, quote
from cifar10_serving.server.explain import GRAD_CAM, INPUT, SALIENCY, Maps
from cifar10_serving.server.filters import LayerWeights
from cifar10_serving.server.grpc_handlers import GRPC_STATUS, NO_RESERVATION, deadline_of, lookup, unary
from cifar10_serving.server.images import Encoded, ImageError, Raw, Resize, Source
from cifar10_serving.server.models import LoadedModel

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Classifier"].full_name  # "cifar10.v1.Classifier"
ALL_LAYERS = "*"
DEFAULT_TOP_K = 5
# Stream requests in progress at once, which keeps answers in order; their bytes are bounded by the
# answer budget, which every request of every stream reserves from, refusals included.
STREAM_WINDOW = 64
RESIZE = {pb.RESIZE_CENTER_CROP: Resize.CENTER_CROP, pb.RESIZE_REJECT: Resize.REJECT}
RAW_DTYPES = {pb.DTYPE_UNSPECIFIED: np.dtype(np.uint8), pb.DTYPE_UINT8: np.dtype(np.uint8),
              pb.DTYPE_FLOAT32: np.dtype("<f4")}
FEATURE_DTYPES = {pb.DTYPE_UNSPECIFIED: ("<f4", pb.DTYPE_FLOAT32), pb.DTYPE_FLOAT32: ("<f4", pb.DTYPE_FLOAT32),
                  pb.DTYPE_FLOAT16: ("<f2", pb.DTYPE_FLOAT16)}


@dataclass(frozen=True)
class Plan:
    """A validated Classify request: which model, which options."""

    model: LoadedModel
    top_k: int
    layers: tuple[str, ...]
    feature_dtype: tuple[str, int]  # numpy byte order and type, and the DType the answer names
    resize: Resize
    echo_bytes: int


class V1Servicer(pb_grpc.ClassifierServicer):
    def __init__(self, core: ServingCore) -> None:
        self.core = core
        self.config = core.config
        self.metrics = core.metrics

    # ------------------------------------------------------------------ rpcs
    async def Classify(self, request: pb.ClassifyRequest, context: grpc.aio.ServicerContext):
        return await unary(context, self.metrics, "Classify", self.core.label(request.model),
                           lambda call, deadline: self._classify(request, deadline), images=len(request.images))

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
                try:
                    response, reservation = await task
                except Rejection as rejection:  # no room for even a refusal: the stream ends here
                    await context.abort(GRPC_STATUS[rejection.code], rejection.message)
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
        return await lookup(context, self.metrics, "ListModels", "", lambda: pb.ListModelsResponse(  # names no model
            models=[self._info(m) for m in self.core.models()], default_model=self.core.default_model,
            versions=[pb.ModelVersion(name=v.name, version=v.version, state=v.state, reason=v.reason)
                      for v in self.core.repository.index()]))

    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context) -> pb.ModelInfo:
        return await lookup(context, self.metrics, "GetModelInfo", self.core.label(request.name),
                            lambda: self._info(self.core.model(request.name, request.version)))

    async def Explain(self, request: pb.ExplainRequest, context) -> pb.ExplainResponse:
        return await unary(context, self.metrics, "Explain", self.core.label(request.model),
                           lambda call, deadline: self._explain(request, deadline))

    async def GetFilters(self, request: pb.GetFiltersRequest, context) -> pb.Filters:
        return await unary(context, self.metrics, "GetFilters", self.core.label(request.model),
                           lambda call, deadline: self._filters(request))

    # ------------------------------------------------------------------ Classify
    async def _classify(self, request: pb.ClassifyRequest,
                        deadline: float | None) -> tuple[pb.ClassifyResponse | bytes, Reservation]:
        """The answer, and its reservation from the answer budget, which the caller releases once
        the answer is written (released here if anything fails)."""
        plan = self._plan(request)
        reservation = self.core.reserve(plan.model, images=len(request.images), request_bytes=request.ByteSize(),
                                        echo_bytes=plan.echo_bytes, layers=plan.layers,
                                        itemsize=np.dtype(plan.feature_dtype[0]).itemsize, advice=_advice(plan))
        try:
            images = await self.core.decode(plan.model, sources(request.images), plan.resize, deadline)
            result = await self.core.infer(plan.model, images, plan.layers, deadline, reservation)
            if plan.layers:  # feature maps: tens of MB, encoded as wire bytes on a thread (server.wire)
                return await self.core.off_loop(_encode, request, plan, result), reservation
            return _build(request, plan, result), reservation  # a few small messages: cheaper here than a hop
        except BaseException:
            reservation.release()
            raise

    def _plan(self, request: pb.ClassifyRequest) -> Plan:
        model = self.core.model(request.model, request.model_version)
        echo = self.core.check_echo("request_id", request.request_id)
        n = len(request.images)
        if n == 0:
            raise invalid(f"no images in the request; send 1 to {self.config.max_batch_size}")
        if n > self.config.max_batch_size:
            raise invalid(f"{n} images in one request; the limit is {self.config.max_batch_size}, split the batch")
        classes = len(model.class_names)
        k = request.top_k or min(DEFAULT_TOP_K, classes)
        if k > classes:
            raise invalid(f"top_k is {k}; it must be 1 to {classes}")
        resize = RESIZE.get(request.resize)
        if resize is None:
            raise invalid(f"unknown resize mode {request.resize}")
        dtype = FEATURE_DTYPES.get(request.feature_dtype)
        if dtype is None:
            raise invalid(f"feature_dtype {_enum_name(pb.DType, request.feature_dtype)} not offered; "
                          "use FLOAT32 or FLOAT16")
        return Plan(model, k, feature_layers(model, request.feature_layers), dtype, resize, echo)

    async def _stream_one(self, request: pb.ClassifyRequest,
                          deadline: float | None) -> tuple[pb.ClassifyResponse | bytes, Reservation]:
        """One request of a stream: a refusal is this request's answer, and the stream goes on. The
        refusal reserves its bytes too; when even that does not fit, the stream ends
        RESOURCE_EXHAUSTED (the requests not answered are the client's to send again)."""
        label = self.core.label(request.model)
        try:
            with Call(self.metrics, "ClassifyStream", label, len(request.images), deadline=deadline):
                return await self._classify(request, deadline)
        except Rejection as rejection:
            try:
                echo = request.request_id if self.core.check_echo("request_id", request.request_id) else ""
            except Rejection:
                echo = ""  # the refusal is for its length: not echoed
            reservation = self.core.reserve_refusal(label, rejection.message, len(echo))
            return pb.ClassifyResponse(request_id=echo, error=pb.Error(code=rejection.code.value,
                                                                       message=rejection.message)), reservation

    # ------------------------------------------------------------------ Explain
    async def _explain(self, request: pb.ExplainRequest,
                       deadline: float | None) -> tuple[pb.ExplainResponse, Reservation]:
        model = self.core.model(request.model, request.model_version)
        echo = self.core.check_echo("request_id", request.request_id)
        resize = RESIZE.get(request.resize)
        if resize is None:
            raise invalid(f"unknown resize mode {request.resize}")
        target = request.class_index if request.HasField("class_index") else None
        layer = self.core.explainer.plan(model, len(request.images), request.layer, target)
        reservation = self.core.reserve_explanation(model, images=len(request.images),
                                                    request_bytes=request.ByteSize(), echo_bytes=echo)
        try:
            maps = await self.core.explain(model, sources(request.images), resize, layer, target, deadline)
            return await self.core.off_loop(_explanation, request, model, layer, maps), reservation
        except BaseException:
            reservation.release()
            raise

    # ------------------------------------------------------------------ GetFilters
    async def _filters(self, request: pb.GetFiltersRequest) -> tuple[pb.Filters, Reservation]:
        model = self.core.model(request.model, request.model_version)
        dtype = FEATURE_DTYPES.get(request.dtype)
        if dtype is None:
            raise invalid(f"dtype {_enum_name(pb.DType, request.dtype)} not offered for filters; use FLOAT32 or FLOAT16")
        weights, reservation = await self.core.filters(model, request.layers, np.dtype(dtype[0]).itemsize,
                                                       request.ByteSize())
        try:  # megabytes of values copied: on the answer thread, off the loop
            return await self.core.off_loop(_filters, model, weights, dtype), reservation
        except BaseException:
            reservation.release()
            raise

    def _info(self, model: LoadedModel) -> pb.ModelInfo:
        return model_info(model, is_default=model.name == self.core.default_model)



# ----------------------------------------------------------------------------- requests in
def sources(images) -> list[Source]:
    """The request's ``Image`` messages as the core's image sources; ImageError names the image."""
    out: list[Source] = []
    try:
        for i, image in enumerate(images):
            out.append(source(image, i))
    except ImageError as exc:
        raise invalid(str(exc)) from None
    return out


def source(image: pb.Image, index: int) -> Source:
    """One ``Image`` message as the core's image source; ImageError names the image and the fix."""
    kind = image.WhichOneof("data")
    if kind == "encoded":
        return Encoded(image.encoded)
    if kind != "raw":
        raise ImageError(f"image {index}: empty; set Image.encoded (PNG/JPEG bytes) or Image.raw")
    raw = image.raw
    dtype = RAW_DTYPES.get(raw.dtype)
    if dtype is None:
        raise ImageError(f"image {index}: raw dtype {_enum_name(pb.DType, raw.dtype)} not accepted; use UINT8 or FLOAT32")
    if raw.layout not in (pb.LAYOUT_HWC, pb.LAYOUT_CHW):
        raise ImageError(f"image {index}: raw layout {raw.layout} unknown; use LAYOUT_HWC or LAYOUT_CHW")
    if len(raw.shape) != 3:  # its length first: a shape of millions is refused without reading it
        expected = "[H, W, 3]" if raw.layout == pb.LAYOUT_HWC else "[3, H, W]"
        raise ImageError(f"image {index}: raw shape {listing(raw.shape)} with {pb.Layout.Name(raw.layout)}; "
                         f"expected {expected}")
    return Raw(raw.data, tuple(raw.shape), dtype, channels_last=raw.layout == pb.LAYOUT_HWC)


def feature_layers(model: LoadedModel, names) -> tuple[str, ...]:
    """The layers a request asks for, in the model's order; ``*`` for all."""
    if not names:
        return ()
    if len(names) > len(model.layer_names):  # its length first: more names than layers repeats or invents some
        raise invalid(f"{len(names):,} feature_layers asked for; model {model.name!r} has {len(model.layer_names)} "
                      f"layers: {', '.join(model.layer_names)}, or send {ALL_LAYERS!r} alone")
    names = list(names)
    if ALL_LAYERS in names:
        if len(names) > 1:
            raise invalid(f"{ALL_LAYERS!r} asks for all layers; send it alone")
        return tuple(model.layer_names)
    seen = set()
    for name in names:
        if name in seen:
            raise invalid(f"layer {quote(name)} asked for twice")
        seen.add(name)
        if name not in model.layer_names:
            raise invalid(f"model {model.name!r} has no layer {quote(name)}; its layers: {', '.join(model.layer_names)}")
    order = {name: i for i, name in enumerate(model.layer_names)}
    return tuple(sorted(names, key=order.__getitem__))


# ----------------------------------------------------------------------------- answers out
def _advice(plan: Plan) -> str:
    if not plan.layers:
        return "send fewer images per request"
    cheaper = "" if plan.feature_dtype[0] == "<f2" else ", feature_dtype=FLOAT16"
    return f"ask for fewer feature_layers (this asks for {len(plan.layers)}){cheaper}, or fewer images per request"


def _encode(request: pb.ClassifyRequest, plan: Plan, result: BatchResult) -> bytes:
    """An answer with feature maps, as ClassifyResponse wire bytes (on the core's encoding thread)."""
    model = plan.model
    byte_order, dtype_enum = plan.feature_dtype
    maps = {name: np.ascontiguousarray(result.features[name], dtype=byte_order) for name in plan.layers}
    return wire.encode_response(request.request_id, model.name, model.version, model.class_names,
                                result.probabilities, top_k(result.probabilities, plan.top_k), maps, dtype_enum)


def _build(request: pb.ClassifyRequest, plan: Plan, result: BatchResult) -> pb.ClassifyResponse:
    """An answer without feature maps."""
    model = plan.model
    order = top_k(result.probabilities, plan.top_k)
    results = [pb.Result(probabilities=probs.tolist(), top_k=[
        pb.Prediction(label=model.class_names[j], index=int(j), probability=float(probs[j])) for j in order[i]])
        for i, probs in enumerate(result.probabilities)]
    return pb.ClassifyResponse(request_id=request.request_id, model=model.name, model_version=model.version,
                               results=results)


def _explanation(request: pb.ExplainRequest, model: LoadedModel, layer: str, maps: Maps) -> pb.ExplainResponse:
    shape = list(maps.saliency.shape[1:])
    explanations = [
        pb.Explanation(class_index=int(c), label=model.class_names[int(c)], probability=float(p), maps=[
            pb.ExplanationMap(method=SALIENCY, layer=INPUT, shape=shape, values=s.ravel().tolist()),
            pb.ExplanationMap(method=GRAD_CAM, layer=layer, shape=shape, values=g.ravel().tolist())])
        for c, p, s, g in zip(maps.classes, maps.probabilities, maps.saliency, maps.grad_cam)]
    return pb.ExplainResponse(request_id=request.request_id, model=model.name, model_version=model.version,
                              explanations=explanations)


def _filters(model: LoadedModel, weights: list[LayerWeights], dtype: tuple[str, int]) -> pb.Filters:
    byte_order, dtype_enum = dtype

    def tensor(array: np.ndarray) -> pb.WeightTensor:
        return pb.WeightTensor(shape=array.shape, dtype=dtype_enum,
                               data=np.ascontiguousarray(array, dtype=byte_order).tobytes())

    return pb.Filters(model=model.name, model_version=model.version, layers=[
        pb.LayerFilters(layer=w.layer, kind=w.kind, weight=tensor(w.weight),
                        bias=None if w.bias is None else tensor(w.bias)) for w in weights])


def model_info(model: LoadedModel, is_default: bool) -> pb.ModelInfo:
    """A model's ModelInfo, from its artifact's embedded metadata."""
    meta = model.metadata
    pooling = meta.get("pooling", {})
    validation = meta.get("validation") or {}
    dataset = meta.get("dataset") or {}
    source = dataset.get("source", "")
    return pb.ModelInfo(
        name=model.name,
        version=model.version,
        is_default=is_default,
        class_names=model.class_names,
        input=pb.InputSpec(shape=model.input_shape, dtype=meta["input"].get("dtype", "uint8"),
                           color=meta["input"].get("color", "RGB")),
        pooling=pb.Pooling(kind=pooling.get("kind", ""), window=pooling.get("window", 0),
                           stride=pooling.get("stride", 0), padding=pooling.get("padding", 0)),
        layers=[pb.Layer(name=row["name"], kind=row["kind"], output_shape=row["output_shape"],
                         flops=row.get("flops", 0), kernel=row.get("kernel", 0), stride=row.get("stride", 0))
                for row in meta["layers"]],
        flops_per_image=meta.get("flops_per_image", 0),
        parameters=meta.get("parameters", 0),
        validation_accuracy=validation.get("accuracy") or 0.0,
        validation_images=validation.get("images") or 0,
        dataset="CIFAR-10 (JPEG)" if source.startswith("jpeg-archive") else ("CIFAR-10" if source else ""),
        device=str(model.device),
        metadata_json=json.dumps(meta),
    )


def _release_result(task: asyncio.Task) -> None:
    """Gives back the reservation of a stream request's answer that was never written."""
    if not task.cancelled() and task.exception() is None:
        task.result()[1].release()


def _enum_name(enum, value: int) -> str:
    """The name of an enum value, or its number: proto3 keeps values this server does not know."""
    return enum.Name(value) if value in enum.values() else str(value)
