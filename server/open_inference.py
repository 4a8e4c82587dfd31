"""The Open Inference Protocol (KServe v2) over gRPC: ``inference.GRPCInferenceService``.

A thin translator over the serving core (``server.core``), served beside ``cifar10.v1.Classifier`` on
the same port, behind the same TLS, tokens and drain: the same model set, budget, decode lanes,
batchers and metrics. A request is planned (model, version, input tensor, requested outputs), its
input handed to the core as images, and its outputs are built from the batch's result, in the
request's encoding (raw bytes or typed contents). It imports nothing of the cifar10.v1 API.

The protocol's rules (tensor names, datatypes, shapes, parameters, metadata, configuration,
statistics, the repository calls) are ``server.v2_tensors``', shared with the HTTP front-end; this
module reads protobuf messages into them and writes their answers back as protobuf.

Tensor names are the cifar10.v1 API's words, so one vocabulary serves both APIs: the input ``image`` (the
model's own layout, N x 3 x 32 x 32) or ``encoded_image`` (PNG/JPEG files), the output
``probabilities`` (``Result.probabilities``), every layer by the name ListModels gives it
(``stage1.pool``), and the explanations ``saliency`` and ``grad_cam`` (cifar10.v1 ``Explain``'s maps).
Triton's ``INPUT__0`` style exists because its PyTorch backend cannot know names; this server can,
and v2 clients read them from ModelMetadata.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import metadata as package_metadata

import numpy as np
from google.protobuf import json_format
from grpc_health.v1 import health_pb2

from cifar10_serving.protos.inference import open_inference_grpc_pb2 as v2
from cifar10_serving.protos.inference import open_inference_grpc_pb2_grpc as v2_grpc
from cifar10_serving.server import v2_tensors as rules
from cifar10_serving.server import wire
from cifar10_serving.server.answer_budget import Reservation, Reservations
from cifar10_serving.server.calls import Call
from cifar10_serving.server.core import ServingCore
from cifar10_serving.server.errors import LIST_ITEMS, Rejection, invalid, quote
from cifar10_serving.server.grpc_handlers import NO_RESERVATION, lookup, unary
from cifar10_serving.server.images import Encoded, Raw, Resize, Source
from cifar10_serving.server.models import LoadedModel
from cifar10_serving.server.statistics import VersionStatistics
from cifar10_serving.server.v2_tensors import ENCODED_IMAGE, IMAGE, IMAGE_DTYPES, SERVER_NAME

RAW_OUTPUT_FIELD = v2.ModelInferResponse.DESCRIPTOR.fields_by_name["raw_output_contents"].number
SERVICE_NAME = v2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name  # "inference.GRPCInferenceService"
# Triton's: top-k as "score:index:label" strings; ModelConfig; ModelStatistics; the Repository calls.
EXTENSIONS = ("classification", "model_configuration", "statistics", "model_repository")
RAW_WORDS = "raw contents; send the input as raw_input_contents"  # how FP16 outputs must travel


@dataclass(frozen=True)
class InferPlan:
    model: LoadedModel
    tensor: v2.ModelInferRequest.InferInputTensor
    images: int
    raw: bytes | None  # the input's raw contents; None: typed contents (and the answer typed too)
    outputs: rules.Outputs
    echo_bytes: int  # the request's id, which the answer echoes

    @property
    def layers(self) -> tuple[str, ...]:
        return self.outputs.layers


class OpenInferenceServicer(v2_grpc.GRPCInferenceServiceServicer):
    """The v2 API over the serving core."""

    def __init__(self, core: ServingCore, health) -> None:
        self.core = core
        self.config = core.config
        self.metrics = core.metrics
        self.health = health  # the health servicer: readiness follows it
        core.validators.append(rules.check_names)  # a model whose layers clash with the tensor names is not loaded
        try:
            self._version = package_metadata.version(SERVER_NAME)
        except package_metadata.PackageNotFoundError:  # running from a checkout that is not installed
            self._version = "0+unknown"

    # ------------------------------------------------------------------ health and metadata
    async def ServerLive(self, request, context) -> v2.ServerLiveResponse:
        return v2.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context) -> v2.ServerReadyResponse:
        return v2.ServerReadyResponse(ready=await self._serving(""))

    async def ModelReady(self, request: v2.ModelReadyRequest, context) -> v2.ModelReadyResponse:
        # A readiness probe wants a yes or no: a model or version that is not loaded is not ready.
        try:
            self.core.model(request.name, request.version)
        except Rejection:
            return v2.ModelReadyResponse(ready=False)
        return v2.ModelReadyResponse(ready=await self._serving(SERVICE_NAME))

    async def ServerMetadata(self, request, context) -> v2.ServerMetadataResponse:
        return v2.ServerMetadataResponse(name=SERVER_NAME, version=self._version, extensions=EXTENSIONS)

    async def ModelMetadata(self, request: v2.ModelMetadataRequest, context) -> v2.ModelMetadataResponse:
        return await lookup(context, self.metrics, "ModelMetadata", self.core.label(request.name),
                            lambda: self._metadata_of(self.core.model(request.name, request.version)))

    def _metadata_of(self, model: LoadedModel) -> v2.ModelMetadataResponse:
        """Its metadata, listing every version of the model that is ready."""
        return model_metadata(model, [m.version for m in self.core.models() if m.name == model.name])

    # ------------------------------------------------------------------ Triton's extensions
    async def ModelConfig(self, request: v2.ModelConfigRequest, context) -> v2.ModelConfigResponse:
        return await lookup(context, self.metrics, "ModelConfig", self.core.label(request.name),
                            lambda: v2.ModelConfigResponse(config=self._config(
                                self.core.model(request.name, request.version))))

    async def ModelStatistics(self, request: v2.ModelStatisticsRequest, context) -> v2.ModelStatisticsResponse:
        async def work(call: Call, deadline: float | None):  # with --workers, the siblings are asked
            versions = await self.core.statistics(request.name, request.version)
            return v2.ModelStatisticsResponse(model_stats=[model_statistics(v) for v in versions]), NO_RESERVATION

        return await unary(context, self.metrics, "ModelStatistics", self.core.label(request.name), work,
                           in_flight=False)

    async def RepositoryIndex(self, request: v2.RepositoryIndexRequest, context) -> v2.RepositoryIndexResponse:
        def index() -> v2.RepositoryIndexResponse:
            rules.one_repository(request.repository_name)
            return v2.RepositoryIndexResponse(models=[
                v2.RepositoryIndexResponse.ModelIndex(**entry)
                for entry in rules.repository_index(self.core.repository.index(ready_only=request.ready))])

        return await lookup(context, self.metrics, "RepositoryIndex", "", index)

    async def RepositoryModelLoad(self, request: v2.RepositoryModelLoadRequest,
                                  context) -> v2.RepositoryModelLoadResponse:
        return await self._change(context, "RepositoryModelLoad", request, self.core.repository.load,
                                  v2.RepositoryModelLoadResponse())

    async def RepositoryModelUnload(self, request: v2.RepositoryModelUnloadRequest,
                                    context) -> v2.RepositoryModelUnloadResponse:
        return await self._change(context, "RepositoryModelUnload", request, self.core.repository.unload,
                                  v2.RepositoryModelUnloadResponse())

    async def _change(self, context, method: str, request, change, answer):
        """A load or an unload, by ``server.v2_tensors.check_change``'s rules."""
        async def work(call: Call, deadline: float | None):
            rules.check_change(self.config.model_control_mode, method,
                               {k: _value(p) for k, p in request.parameters.items()}, request.repository_name)
            await change(request.model_name)
            return answer, NO_RESERVATION

        return await unary(context, self.metrics, method, self.core.label(request.model_name), work, in_flight=False)

    def _config(self, model: LoadedModel) -> v2.ModelConfig:
        return model_config(model, self.config, self.core.server_instances, self.core.device.type)

    # ------------------------------------------------------------------ inference
    async def ModelInfer(self, request: v2.ModelInferRequest, context) -> v2.ModelInferResponse | bytes:
        return await unary(context, self.metrics, "ModelInfer", self.core.label(request.model_name),
                           lambda call, deadline: self._infer(request, call, deadline))

    async def _infer(self, request: v2.ModelInferRequest, call: Call,
                     deadline: float | None) -> tuple[v2.ModelInferResponse | bytes, Reservation]:
        plan = self._plan(request)
        if plan.outputs.explanation is not None and not plan.outputs.inference:
            return await self._explain(request, plan, deadline)
        held = Reservations()
        try:
            explained = []
            if plan.outputs.explanation is not None:  # both paths: the explanation's first, each reserved
                explained = await self._explanation_tensors(request, plan, deadline, held)
            answer, reservation = await self._inference(request, plan, call, deadline, explained)
        except BaseException:
            held.release()
            raise
        held.append(reservation)
        return answer, held

    async def _inference(self, request: v2.ModelInferRequest, plan: InferPlan, call: Call,
                         deadline: float | None, explained: list) -> tuple[v2.ModelInferResponse | bytes, Reservation]:
        call.images = plan.images  # known once the shape is checked
        # Feature maps counted at float32, the largest type an output may ask for.
        advice = (f"request fewer layer outputs (this asks for {len(plan.layers)}), FP16 ones, or fewer images"
                  if plan.layers else "send fewer images per request")
        reservation = self.core.reserve(plan.model, images=plan.images, request_bytes=request.ByteSize(),
                                        echo_bytes=plan.echo_bytes, layers=plan.layers, advice=advice)
        try:
            images = await self._images(plan, deadline)
            result = await self.core.infer(plan.model, images, plan.layers, deadline, reservation)
            tensors = plan.outputs.in_order(
                rules.inference_tensors(plan.model, plan.outputs, result.probabilities, result.features) + explained)
            if plan.layers or explained:  # feature maps: tens of MB, encoded as wire bytes on a thread (server.wire)
                return await self.core.off_loop(encode_infer_response, request, plan, tensors), reservation
            return respond(request, plan, tensors), reservation
        except BaseException:
            reservation.release()
            raise

    async def _explain(self, request: v2.ModelInferRequest, plan: InferPlan,
                       deadline: float | None) -> tuple[v2.ModelInferResponse | bytes, Reservation]:
        """Saliency and Grad-CAM on the core's explanation path, as cifar10.v1's Explain takes it:
        checked, reserved, then a place on the path (RESOURCE_EXHAUSTED at once when none is free).
        Explained images are not counted as classified ones."""
        held = Reservations()
        try:
            tensors = await self._explanation_tensors(request, plan, deadline, held)
            return await self.core.off_loop(encode_infer_response, request, plan, tensors), held
        except BaseException:
            held.release()
            raise

    async def _explanation_tensors(self, request: v2.ModelInferRequest, plan: InferPlan, deadline: float | None,
                                   held: Reservations) -> list:
        """The explanation outputs, their reservation added to ``held``."""
        model, ask = plan.model, plan.outputs.explanation
        layer = self.core.explainer.plan(model, plan.images, ask.layer, ask.target)
        held.append(self.core.reserve_explanation(model, images=plan.images, request_bytes=request.ByteSize(),
                                                  echo_bytes=plan.echo_bytes))
        try:
            maps = await self.core.explain(model, await self._sources(plan), Resize.CENTER_CROP, layer, ask.target,
                                           deadline)
        except Rejection as rejection:
            raise (rules.with_input_name(rejection) if plan.tensor.name == ENCODED_IMAGE else rejection) from None
        return rules.explanation_tensors(plan.outputs, maps, layer)

    # ------------------------------------------------------------------ plan
    def _plan(self, request: v2.ModelInferRequest) -> InferPlan:
        model = self.core.model(request.model_name, request.model_version)
        echo = self.core.check_echo("id", request.id)
        explain = rules.request_parameters(request.parameters if len(request.parameters) > LIST_ITEMS
                                           else {k: _value(p) for k, p in request.parameters.items()})
        if len(request.inputs) != 1:
            raise invalid(f"{len(request.inputs)} input tensors; send one: {IMAGE!r} (UINT8 or FP32 "
                          f"[N, {', '.join(map(str, model.input_shape))}]) or {ENCODED_IMAGE!r} (BYTES [N])")
        tensor = request.inputs[0]
        raw = None
        if request.raw_input_contents:
            if len(request.raw_input_contents) != 1:
                raise invalid(f"{len(request.raw_input_contents)} raw_input_contents for 1 input; send one per input")
            if tensor.HasField("contents"):
                raise invalid(f"input {quote(tensor.name)}: both raw_input_contents and typed contents; send one")
            raw = request.raw_input_contents[0]
        rules.no_parameters(tensor.parameters, f"input {quote(tensor.name)}")
        n = rules.check_input(model, tensor.name, tensor.datatype, tensor.shape, self.config.max_batch_size)

        def read(i: int, output) -> tuple[str, dict, bool]:
            return output.name, {k: _value(p) for k, p in output.parameters.items()}, raw is not None

        outputs = rules.plan_outputs(model, request.outputs, read, default_raw=raw is not None, raw_words=RAW_WORDS,
                                     explain=explain)
        return InferPlan(model, tensor, n, raw, outputs, echo)

    async def _serving(self, service: str) -> bool:
        response = await self.health.Check(health_pb2.HealthCheckRequest(service=service), None)
        return response.status == health_pb2.HealthCheckResponse.SERVING

    # ------------------------------------------------------------------ the input as images
    async def _pixels(self, plan: InferPlan) -> np.ndarray:
        """The ``image`` input as the model's uint8 images: raw here (a copy bounded by the batch
        limit), typed contents on the core's thread (a Python list per value)."""
        shape = (plan.images, *plan.model.input_shape)
        tensor = plan.tensor
        array = (rules.image_from_bytes(plan.raw, tensor.datatype, plan.images, plan.model, "raw contents are")
                 if plan.raw is not None else await self.core.off_loop(_typed_image, tensor, shape))
        return self.core.tensor(plan.model, array, f"input {IMAGE!r}: {tensor.datatype}")

    def _files(self, plan: InferPlan) -> list[Encoded]:
        return [Encoded(data) for data in _bytes_elements(plan.tensor, plan.raw, plan.images)]

    async def _images(self, plan: InferPlan, deadline: float | None) -> np.ndarray:
        """The input as the model's uint8 images; encoded files on the core's fair, abandonable decode lanes."""
        if plan.tensor.name == IMAGE:
            return await self._pixels(plan)
        try:
            return await self.core.decode(plan.model, self._files(plan), Resize.CENTER_CROP, deadline)
        except Rejection as rejection:
            raise rules.with_input_name(rejection) from None

    async def _sources(self, plan: InferPlan) -> list[Source]:
        """The input as the core's image sources, for the explanation path (which decodes them itself)."""
        if plan.tensor.name == ENCODED_IMAGE:
            return self._files(plan)
        pixels = await self._pixels(plan)
        return [Raw(image.tobytes(), image.shape, pixels.dtype, channels_last=False) for image in pixels]


# ----------------------------------------------------------------------------- tensors in
def _typed_image(tensor, shape: tuple[int, ...]) -> np.ndarray:
    """The ``image`` input from typed contents, N x C x H x W in its datatype."""
    dtype = IMAGE_DTYPES[tensor.datatype]
    field = "uint_contents" if dtype == np.uint8 else "fp32_contents"
    values = getattr(tensor.contents, field)
    count = int(np.prod(shape))
    if len(values) != count:
        raise invalid(f"input {IMAGE!r}: {len(values)} elements in contents.{field}; shape {list(shape)} "
                      f"needs {count}")
    return rules.image_from_values(np.array(values, dtype=np.uint32 if dtype == np.uint8 else dtype),
                                   tensor.datatype, shape)


def _bytes_elements(tensor, raw: bytes | None, n: int) -> list[bytes]:
    """The elements of a BYTES input: typed ``bytes_contents``, or raw length-prefixed elements."""
    if raw is not None:
        return rules.bytes_elements(raw, n, "raw contents")
    files = list(tensor.contents.bytes_contents)
    if len(files) != n:
        raise invalid(f"input {ENCODED_IMAGE!r}: {len(files)} elements in contents.bytes_contents; "
                      f"shape [{n}] needs {n}")
    return files


def _value(parameter):
    """An InferParameter (or ModelRepositoryParameter) as the Python value it holds; None when unset."""
    kind = parameter.WhichOneof("parameter_choice")
    return getattr(parameter, kind) if kind else None


# ----------------------------------------------------------------------------- tensors out
def respond(request: v2.ModelInferRequest, plan: InferPlan, tensors: list[rules.Tensor],
            raw_parts: list | None = None) -> v2.ModelInferResponse:
    """The outputs, in the order asked, as raw contents or typed as the input was sent. With
    ``raw_parts`` given, raw contents are appended to it as arrays instead of to the message."""
    model = plan.model
    response = v2.ModelInferResponse(model_name=model.name, model_version=model.version, id=request.id)
    for t in tensors:
        tensor = response.outputs.add(name=t.output.name, datatype=t.datatype, shape=t.array.shape)
        for key, value in t.parameters.items():
            _set(tensor.parameters[key], value)
        if not t.output.raw and t.datatype == "BYTES":
            tensor.contents.bytes_contents.extend(t.array.ravel().tolist())
        elif not t.output.raw:
            tensor.contents.fp32_contents.extend(t.array.ravel().tolist())
        else:
            array = (np.frombuffer(rules.pack_bytes(t.array), dtype=np.uint8) if t.datatype == "BYTES"
                     else t.array)
            if raw_parts is not None:
                raw_parts.append(array)
            else:
                response.raw_output_contents.append(array.tobytes())
    return response


def encode_infer_response(request: v2.ModelInferRequest, plan: InferPlan, tensors: list[rules.Tensor]) -> bytes:
    """``respond``'s answer in wire format, for a thread: the raw contents (field 6, the last) are
    copied by numpy, without the GIL, into the answer's bytes rather than through protobuf, which
    would copy them twice holding it."""
    if plan.raw is None:  # typed contents: no way round protobuf
        return respond(request, plan, tensors).SerializeToString()
    parts: list = []
    head = respond(request, plan, tensors, parts)
    return wire.with_raw_fields(head.SerializeToString(), RAW_OUTPUT_FIELD, parts)


def _set(parameter: v2.InferParameter, value) -> None:
    if isinstance(value, bool):
        parameter.bool_param = value
    elif isinstance(value, int):
        parameter.int64_param = value
    else:
        parameter.string_param = str(value)


# ----------------------------------------------------------------------------- what the server says of a model
def model_metadata(model: LoadedModel, versions=None) -> v2.ModelMetadataResponse:
    """``server.v2_tensors.model_metadata`` as the protocol's message."""
    return json_format.ParseDict(rules.model_metadata(model, versions), v2.ModelMetadataResponse())


def model_config(model: LoadedModel, config, instances: int, device_type: str) -> v2.ModelConfig:
    """``server.v2_tensors.model_config`` as Triton's message."""
    return json_format.ParseDict(rules.model_config(model, config, instances, device_type), v2.ModelConfig())


def model_statistics(version: VersionStatistics) -> v2.ModelStatistics:
    """One version's statistics (``server.v2_tensors.model_statistics``) as Triton's message."""
    return json_format.ParseDict(rules.model_statistics(version), v2.ModelStatistics())
