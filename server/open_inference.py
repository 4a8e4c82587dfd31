"""The Open Inference Protocol (KServe v2) over gRPC: ``inference.GRPCInferenceService``.

A thin translator over the serving core (``server.core``), served beside ``cifar10.v1.Classifier`` on
the same port, behind the same TLS, tokens and drain: the same model set, budget, decode lanes,
batchers and metrics. A request is planned (model, version, input tensor, requested outputs), its
input handed to the core as images, and its outputs are built from the batch's result, in the
request's encoding (raw bytes or typed contents). It imports nothing of the cifar10.v1 API.

Tensor names are the cifar10.v1 API's words, so one vocabulary serves both APIs: the input ``image`` (the
model's own layout, N x 3 x 32 x 32) or ``encoded_image`` (PNG/JPEG files), the output
``probabilities`` (``Result.probabilities``), and every layer by the name ListModels gives it
(``stage1.pool``). Triton's ``INPUT__0`` style exists because its PyTorch backend cannot know names;
this server can, and v2 clients read them from ModelMetadata.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from importlib import metadata as package_metadata

import numpy as np
from grpc_health.v1 import health_pb2

from cifar10_serving.protos.inference import open_inference_grpc_pb2 as v2
from cifar10_serving.protos.inference import open_inference_grpc_pb2_grpc as v2_grpc
from cifar10_serving.server import wire
from cifar10_serving.server.answer_budget import Reservation
from cifar10_serving.server.batching import BatchResult
from cifar10_serving.server.calls import Call
from cifar10_serving.server.core import ServingCore, top_k
from cifar10_serving.server.errors import LIST_ITEMS, Code, Rejection, invalid, listing, quote
from cifar10_serving.server.batching import batch_ladder
from cifar10_serving.server.grpc_handlers import NO_RESERVATION, lookup, unary
from cifar10_serving.server.repository import Version
from cifar10_serving.server.images import Encoded, Resize
from cifar10_serving.server.models import LoadedModel, ModelLoadError

RAW_OUTPUT_FIELD = v2.ModelInferResponse.DESCRIPTOR.fields_by_name["raw_output_contents"].number
SERVICE_NAME = v2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name  # "inference.GRPCInferenceService"
SERVER_NAME = "cifar10-serving"
PLATFORM = "pytorch_torchscript"
# Triton's: top-k as "score:index:label" strings; ModelConfig; ModelStatistics; the Repository calls.
EXTENSIONS = ("classification", "model_configuration", "statistics", "model_repository")
IGNORED_PARAMETERS = ("triton_enable_empty_final_response",)
REPOSITORY_CHANGES = ("RepositoryModelLoad", "RepositoryModelUnload")  # explicit mode only; admin tokens

IMAGE = "image"  # UINT8 (0..255) or FP32 (0..1), [N, 3, 32, 32], RGB, channels first
ENCODED_IMAGE = "encoded_image"  # BYTES [N]: one PNG or JPEG file each, scaled and centre-cropped to 32x32
PROBABILITIES = "probabilities"  # FP32 [N, classes]: softmax scores in class index order
CLASSIFICATION = "classification"  # output parameter on probabilities: k -> BYTES [N, k], best first
DATATYPE = "datatype"  # output parameter on a layer: "FP32" (the default) or "FP16", raw only
IMAGE_DTYPES = {"UINT8": np.dtype(np.uint8), "FP32": np.dtype("<f4")}
FEATURE_DTYPES = {"FP32": np.dtype("<f4"), "FP16": np.dtype("<f2")}
_LENGTH = struct.Struct("<I")  # a raw BYTES element's length prefix


@dataclass(frozen=True)
class Output:
    """One requested output: a tensor by name, the top-k strings of probabilities, or a layer."""

    name: str
    top_k: int = 0  # > 0: the classification extension's k
    dtype: np.dtype = FEATURE_DTYPES["FP32"]


@dataclass(frozen=True)
class InferPlan:
    model: LoadedModel
    tensor: v2.ModelInferRequest.InferInputTensor
    raw: bytes | None  # the input's raw contents; None: typed contents (and the answer typed too)
    outputs: tuple[Output, ...]
    echo_bytes: int  # the request's id, which the answer echoes

    @property
    def layers(self) -> tuple[str, ...]:
        return tuple(o.name for o in self.outputs if o.name != PROBABILITIES)


class OpenInferenceServicer(v2_grpc.GRPCInferenceServiceServicer):
    """The v2 API over the serving core."""

    def __init__(self, core: ServingCore, health) -> None:
        self.core = core
        self.config = core.config
        self.metrics = core.metrics
        self.health = health  # the health servicer: readiness follows it
        core.validators.append(model_metadata)  # a model whose layers clash with the tensor names is not loaded
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
        metadata = model_metadata(model)
        del metadata.versions[:]
        metadata.versions.extend(m.version for m in self.core.models() if m.name == model.name)
        return metadata

    # ------------------------------------------------------------------ Triton's extensions
    async def ModelConfig(self, request: v2.ModelConfigRequest, context) -> v2.ModelConfigResponse:
        return await lookup(context, self.metrics, "ModelConfig", self.core.label(request.name),
                            lambda: v2.ModelConfigResponse(config=self._config(
                                self.core.model(request.name, request.version))))

    async def ModelStatistics(self, request: v2.ModelStatisticsRequest, context) -> v2.ModelStatisticsResponse:
        return await lookup(context, self.metrics, "ModelStatistics", self.core.label(request.name),
                            lambda: v2.ModelStatisticsResponse(model_stats=[
                                model_statistics(v) for v in self.core.statistics(request.name, request.version)]))

    async def RepositoryIndex(self, request: v2.RepositoryIndexRequest, context) -> v2.RepositoryIndexResponse:
        def index() -> v2.RepositoryIndexResponse:
            _one_repository(request.repository_name)
            return v2.RepositoryIndexResponse(models=[
                v2.RepositoryIndexResponse.ModelIndex(name=v.name, version=v.version, state=v.state, reason=v.reason)
                for v in self.core.repository.index(ready_only=request.ready)])

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
        """A load or an unload: explicit mode only, a repository name only (no paths, no files, no
        configuration: loading runs the file's code, so only what the operator put there may run)."""
        async def work(call: Call, deadline: float | None):
            if self.config.model_control_mode != "explicit":
                raise Rejection(Code.FAILED_PRECONDITION, f"the server was started with --model-control-mode "
                                f"{self.config.model_control_mode}; loading and unloading by call needs explicit")
            _one_repository(request.repository_name)
            parameters = dict(request.parameters)
            if method == "RepositoryModelUnload":  # tritonclient always sends it; this server has no ensembles
                dependents = parameters.pop("unload_dependents", None)
                if dependents is not None and dependents.WhichOneof("parameter_choice") != "bool_param":
                    raise invalid(f"{method}: 'unload_dependents' must be a bool")
            _no_parameters(parameters, method)
            await change(request.model_name)
            return answer, NO_RESERVATION

        return await unary(context, self.metrics, method, self.core.label(request.model_name), work, in_flight=False)

    def _config(self, model: LoadedModel) -> v2.ModelConfig:
        return model_config(model, self.config, self.core.instances, self.core.device.type)

    # ------------------------------------------------------------------ inference
    async def ModelInfer(self, request: v2.ModelInferRequest, context) -> v2.ModelInferResponse | bytes:
        return await unary(context, self.metrics, "ModelInfer", self.core.label(request.model_name),
                           lambda call, deadline: self._infer(request, call, deadline))

    async def _infer(self, request: v2.ModelInferRequest, call: Call,
                     deadline: float | None) -> tuple[v2.ModelInferResponse | bytes, Reservation]:
        plan = self._plan(request)
        call.images = _batch_size(plan.tensor)  # known once the shape is checked
        # Feature maps counted at float32, the largest type an output may ask for.
        advice = (f"request fewer layer outputs (this asks for {len(plan.layers)}), FP16 ones, or fewer images"
                  if plan.layers else "send fewer images per request")
        reservation = self.core.reserve(plan.model, images=call.images, request_bytes=request.ByteSize(),
                                        echo_bytes=plan.echo_bytes, layers=plan.layers, advice=advice)
        try:
            images = await self._images(plan, deadline)
            result = await self.core.infer(plan.model, images, plan.layers, deadline, reservation)
            if plan.layers:  # feature maps: tens of MB, encoded as wire bytes on a thread (server.wire)
                return await self.core.off_loop(encode_infer_response, request, plan, result), reservation
            return respond(request, plan, result), reservation
        except BaseException:
            reservation.release()
            raise

    # ------------------------------------------------------------------ plan
    def _plan(self, request: v2.ModelInferRequest) -> InferPlan:
        model = self.core.model(request.model_name, request.model_version)
        echo = self.core.check_echo("id", request.id)
        # perf_analyzer sends Triton's flag for decoupled models, which answer a request more than once;
        # this server answers each request once, so the flag changes nothing. Anything else is refused.
        _no_parameters({k: v for k, v in request.parameters.items() if k not in IGNORED_PARAMETERS}
                       if len(request.parameters) <= LIST_ITEMS else request.parameters, "the request")
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
        _no_parameters(tensor.parameters, f"input {quote(tensor.name)}")
        self._check_input(model, tensor)
        return InferPlan(model, tensor, raw, self._outputs(model, request.outputs, typed=raw is None), echo)

    def _check_input(self, model: LoadedModel, tensor: v2.ModelInferRequest.InferInputTensor) -> None:
        limit = self.config.max_batch_size
        if tensor.name == IMAGE:
            expected, dtypes = [-1, *model.input_shape], "UINT8 or FP32"
            dtype_ok = tensor.datatype in IMAGE_DTYPES
        elif tensor.name == ENCODED_IMAGE:
            # [N], or [N, 1] as Triton's clients send it from ModelConfig's dims [1] (reshaped to [N])
            expected, dtypes = ([-1, 1] if len(tensor.shape) == 2 else [-1]), "BYTES"
            dtype_ok = tensor.datatype == "BYTES"
        else:
            raise invalid(f"model {model.name!r} has no input {quote(tensor.name)}; "
                           f"its inputs: {IMAGE!r}, {ENCODED_IMAGE!r}")
        if not dtype_ok:
            raise invalid(f"input {tensor.name!r}: datatype {quote(tensor.datatype)}; send {dtypes}")
        if len(tensor.shape) != len(expected):  # its length first: a shape of millions is refused unread
            raise invalid(f"input {tensor.name!r}: shape {listing(tensor.shape)}; expected {_dims(expected)}")
        shape = list(tensor.shape)
        if shape[1:] != expected[1:]:
            raise invalid(f"input {tensor.name!r}: shape {shape}; expected {_dims(expected)}")
        if not 1 <= shape[0] <= limit:
            raise invalid(f"input {tensor.name!r}: {shape[0]} images; send 1 to {limit}, split a larger batch")

    def _outputs(self, model: LoadedModel, requested, typed: bool) -> tuple[Output, ...]:
        if not requested:
            return (Output(PROBABILITIES),)
        if len(requested) > 1 + len(model.layer_names):  # its length first: more than there are repeats some
            raise invalid(f"{len(requested):,} outputs requested; model {model.name!r} has "
                           f"{1 + len(model.layer_names)}: {PROBABILITIES!r} and its layers")
        outputs, seen = [], set()
        for tensor in requested:
            name, what = tensor.name, f"output {quote(tensor.name)}"
            if name in seen:
                raise invalid(f"{what} asked for twice")
            seen.add(name)
            params = dict(tensor.parameters)
            if name == PROBABILITIES:
                top_k = self._top_k(model, params.pop(CLASSIFICATION, None), what)
                _no_parameters(params, what)
                outputs.append(Output(name, top_k))
            elif name in model.layer_names:
                dtype = self._feature_dtype(params.pop(DATATYPE, None), what, typed)
                if CLASSIFICATION in params:
                    raise invalid(f"{what}: {CLASSIFICATION!r} applies to {PROBABILITIES!r} only")
                _no_parameters(params, what)
                outputs.append(Output(name, dtype=dtype))
            else:
                raise invalid(f"model {model.name!r} has no {what}; its outputs: {PROBABILITIES!r} and "
                               f"its layers, {', '.join(model.layer_names)}")
        return tuple(outputs)

    @staticmethod
    def _top_k(model: LoadedModel, param: v2.InferParameter | None, what: str) -> int:
        if param is None:
            return 0
        kind = param.WhichOneof("parameter_choice")
        classes = len(model.class_names)
        if kind not in ("int64_param", "uint64_param") or not 1 <= getattr(param, kind) <= classes:
            value = getattr(param, kind) if kind else "unset"
            shown = quote(value) if isinstance(value, str) else value
            raise invalid(f"{what}: {CLASSIFICATION!r} is {shown}; send an integer 1 to {classes}")
        return getattr(param, kind)

    @staticmethod
    def _feature_dtype(param: v2.InferParameter | None, what: str, typed: bool) -> np.dtype:
        if param is None:
            return FEATURE_DTYPES["FP32"]
        value = param.string_param if param.WhichOneof("parameter_choice") == "string_param" else None
        if value not in FEATURE_DTYPES:
            raise invalid(f"{what}: {DATATYPE!r} must be the string \"FP32\" or \"FP16\"")
        if value == "FP16" and typed:
            raise invalid(f"{what}: FP16 travels only as raw contents; send the input as raw_input_contents")
        return FEATURE_DTYPES[value]

    async def _serving(self, service: str) -> bool:
        response = await self.health.Check(health_pb2.HealthCheckRequest(service=service), None)
        return response.status == health_pb2.HealthCheckResponse.SERVING

    # ------------------------------------------------------------------ the input as images
    async def _images(self, plan: InferPlan, deadline: float | None) -> np.ndarray:
        """The input as the model's uint8 images: a raw ``image`` tensor here (a copy bounded by the
        batch limit), typed contents on the core's thread (a Python list per value), encoded files
        on the core's fair, abandonable decode lanes."""
        model, tensor = plan.model, plan.tensor
        n = _batch_size(tensor)
        if tensor.name == IMAGE:
            shape = (n, *model.input_shape)
            array = (_image_tensor(tensor, plan.raw, shape) if plan.raw is not None
                     else await self.core.off_loop(_image_tensor, tensor, None, shape))
            return self.core.tensor(model, array, f"input {IMAGE!r}: {tensor.datatype}")
        files = [Encoded(data) for data in _bytes_elements(tensor, plan.raw, n)]
        try:
            return await self.core.decode(model, files, Resize.CENTER_CROP, deadline)
        except Rejection as rejection:
            if rejection.code is Code.INVALID_ARGUMENT:
                raise invalid(f"input {ENCODED_IMAGE!r}: {rejection.message}") from None
            raise


# ----------------------------------------------------------------------------- tensors in
def _image_tensor(tensor, raw: bytes | None, shape: tuple[int, ...]) -> np.ndarray:
    """The ``image`` input as N x C x H x W, uint8 or float32 as sent; the core checks float32's
    range and rounds it to uint8 (``ServingCore.tensor``), as it does for cifar10.v1's raw images."""
    dtype = IMAGE_DTYPES[tensor.datatype]
    count = int(np.prod(shape))
    if raw is not None:
        if len(raw) != count * dtype.itemsize:
            raise invalid(f"input {IMAGE!r}: raw contents are {len(raw)} bytes; shape {list(shape)} of "
                           f"{tensor.datatype} needs {count * dtype.itemsize}")
        array = np.frombuffer(raw, dtype=dtype)
    else:
        field = "uint_contents" if dtype == np.uint8 else "fp32_contents"
        values = getattr(tensor.contents, field)
        if len(values) != count:
            raise invalid(f"input {IMAGE!r}: {len(values)} elements in contents.{field}; shape {list(shape)} "
                           f"needs {count}")
        if dtype == np.uint8:
            wide = np.array(values, dtype=np.uint32)
            if wide.max(initial=0) > 255:
                raise invalid(f"input {IMAGE!r}: UINT8 values must lie in 0..255")
            array = wide.astype(np.uint8)
        else:
            array = np.array(values, dtype=dtype)
    return array.reshape(shape)


def _bytes_elements(tensor, raw: bytes | None, n: int) -> list[bytes]:
    """The elements of a BYTES input: typed ``bytes_contents``, or raw length-prefixed elements."""
    if raw is None:
        files = list(tensor.contents.bytes_contents)
        if len(files) != n:
            raise invalid(f"input {ENCODED_IMAGE!r}: {len(files)} elements in contents.bytes_contents; "
                           f"shape [{n}] needs {n}")
        return files
    files, offset = [], 0
    for i in range(n):
        if offset + _LENGTH.size > len(raw):
            raise invalid(f"input {ENCODED_IMAGE!r}: raw contents end before element {i} of {n} (each element is "
                           "a 4-byte little-endian length, then that many bytes)")
        (length,) = _LENGTH.unpack_from(raw, offset)
        offset += _LENGTH.size
        if offset + length > len(raw):
            raise invalid(f"input {ENCODED_IMAGE!r}: element {i} declares {length} bytes; "
                           f"{len(raw) - offset} remain in the raw contents")
        files.append(raw[offset: offset + length])
        offset += length
    if offset != len(raw):
        raise invalid(f"input {ENCODED_IMAGE!r}: {len(raw) - offset} bytes after the last of {n} elements")
    return files


def _batch_size(tensor) -> int:
    return int(tensor.shape[0]) if tensor.shape else 0


# ----------------------------------------------------------------------------- tensors out
def respond(request: v2.ModelInferRequest, plan: InferPlan, result: BatchResult,
            raw_parts: list | None = None) -> v2.ModelInferResponse:
    """The requested outputs, in the order asked, as raw contents or typed as the input was sent.
    With ``raw_parts`` given, raw contents are appended to it as arrays instead of to the message."""
    model = plan.model
    response = v2.ModelInferResponse(model_name=model.name, model_version=model.version, id=request.id)
    typed = plan.raw is None
    for output in plan.outputs:
        if output.name == PROBABILITIES and output.top_k:
            datatype, array = "BYTES", _classification(model, result.probabilities, output.top_k)
        elif output.name == PROBABILITIES:
            datatype, array = "FP32", result.probabilities.astype("<f4", copy=False)
        else:
            array = result.features[output.name].astype(output.dtype, copy=False)
            datatype = "FP16" if output.dtype == FEATURE_DTYPES["FP16"] else "FP32"
        tensor = response.outputs.add(name=output.name, datatype=datatype, shape=array.shape)
        if typed and datatype == "BYTES":
            tensor.contents.bytes_contents.extend(array.ravel().tolist())
        elif typed:
            tensor.contents.fp32_contents.extend(array.ravel().tolist())
        else:
            if datatype == "BYTES":
                array = np.frombuffer(b"".join(_LENGTH.pack(len(s)) + s for s in array.ravel()), dtype=np.uint8)
            if raw_parts is not None:
                raw_parts.append(array)
            else:
                response.raw_output_contents.append(array.tobytes())
    return response


def encode_infer_response(request: v2.ModelInferRequest, plan: InferPlan, result: BatchResult) -> bytes:
    """``respond``'s answer in wire format, for a thread: the raw contents (field 6, the last) are
    copied by numpy, without the GIL, into the answer's bytes rather than through protobuf, which
    would copy them twice holding it."""
    if plan.raw is None:  # typed contents: no way round protobuf
        return respond(request, plan, result).SerializeToString()
    parts: list = []
    head = respond(request, plan, result, parts)
    return wire.with_raw_fields(head.SerializeToString(), RAW_OUTPUT_FIELD, parts)


def _classification(model: LoadedModel, probabilities: np.ndarray, k: int) -> np.ndarray:
    """Triton's classification extension: the k best classes of each image, best first, as
    ``b"score:index:label"``; the score is the float32 probability's shortest exact decimal form."""
    order = top_k(probabilities, k)  # cifar10.v1's top_k order
    rows = [[f"{probs[j]!s}:{j}:{model.class_names[j]}".encode() for j in best]  # !s: float32's own str
            for probs, best in zip(probabilities, order)]
    array = np.empty((len(rows), k), dtype=object)
    array[:] = rows
    return array


# ----------------------------------------------------------------------------- metadata
def model_metadata(model: LoadedModel) -> v2.ModelMetadataResponse:
    """Inputs (send one of them) and outputs: probabilities, and every layer as an optional output."""
    tensor = v2.ModelMetadataResponse.TensorMetadata
    layers = {row["name"]: row["output_shape"] for row in model.metadata["layers"]}
    taken = {IMAGE, ENCODED_IMAGE, PROBABILITIES} & set(layers)
    if taken:
        raise ModelLoadError(f"model {model.name!r}: layer names {sorted(taken)} are the v2 API's tensor names")
    return v2.ModelMetadataResponse(
        name=model.name, versions=[model.version], platform=PLATFORM,
        inputs=[tensor(name=IMAGE, datatype="UINT8", shape=[-1, *model.input_shape]),
                tensor(name=ENCODED_IMAGE, datatype="BYTES", shape=[-1, 1])],  # [N] is taken too
        outputs=[tensor(name=PROBABILITIES, datatype="FP32", shape=[-1, len(model.class_names)]),
                 *(tensor(name=name, datatype="FP32", shape=[-1, *shape]) for name, shape in layers.items())])


# ----------------------------------------------------------------------------- helpers
def _no_parameters(parameters, what: str) -> None:
    """Parameters this server does not know are refused, so that a typo or an unsupported feature
    (shared memory, sequences, priorities) does not pass unnoticed. The message names a few."""
    if parameters:
        n = len(parameters)
        first = [name for name, _ in zip(parameters, range(LIST_ITEMS))]
        names = ", ".join(quote(name) for name in sorted(first))
        more = f", ... ({n:,} parameters)" if n > LIST_ITEMS else ""
        raise invalid(f"{what}: parameter {names}{more} not offered by this server")


def _dims(shape: list[int]) -> str:
    return "[" + ", ".join("N" if d == -1 else str(d) for d in shape) + "]"


def model_config(model: LoadedModel, config, instances: int, device_type: str) -> v2.ModelConfig:
    """Triton's configuration of one model as this server runs it: inputs (both optional, since a
    request sends one of them), every output, the batching settings and the instances."""
    layers = {row["name"]: row["output_shape"] for row in model.metadata["layers"]}
    kind = v2.ModelInstanceGroup.KIND_GPU if device_type == "cuda" else v2.ModelInstanceGroup.KIND_CPU
    policy = v2.ModelVersionPolicy()
    name, _, rest = config.version_policy.partition(":")
    if name == "all":
        policy.all.SetInParent()
    elif name == "specific":
        policy.specific.versions.extend(int(v) for v in rest.split(",") if v.isdigit())
    else:
        policy.latest.num_versions = int(rest or 1)
    return v2.ModelConfig(
        name=model.name, platform=PLATFORM, backend="pytorch", version_policy=policy,
        max_batch_size=config.max_batch_size,
        input=[v2.ModelInput(name=IMAGE, data_type=v2.TYPE_UINT8, format=v2.ModelInput.FORMAT_NCHW,
                             dims=list(model.input_shape), optional=True),
               v2.ModelInput(name=ENCODED_IMAGE, data_type=v2.TYPE_STRING, dims=[1],
                             optional=True)],  # [N, 1]: perf_analyzer sets an optional input's shape from dims
        output=[v2.ModelOutput(name=PROBABILITIES, data_type=v2.TYPE_FP32, dims=[len(model.class_names)]),
                *(v2.ModelOutput(name=n, data_type=v2.TYPE_FP32, dims=list(shape)) for n, shape in layers.items())],
        dynamic_batching=v2.ModelDynamicBatching(preferred_batch_size=list(batch_ladder(config.max_batch_size)),
                                                 max_queue_delay_microseconds=config.max_queue_delay_us),
        instance_group=[v2.ModelInstanceGroup(name=f"{model.name}_0", kind=kind, count=instances)],
        default_model_filename=model.path.name)


def model_statistics(version: Version) -> v2.ModelStatistics:
    """One version's statistics (server.statistics) as Triton's message."""
    stats = version.statistics

    def duration(d) -> v2.StatisticDuration:
        return v2.StatisticDuration(count=d.count, ns=d.ns)

    return v2.ModelStatistics(
        name=version.name, version=version.version, last_inference=stats.last_inference_ms,
        inference_count=stats.inference_count, execution_count=stats.execution_count,
        inference_stats=v2.InferStatistics(
            success=duration(stats.success), fail=duration(stats.fail), queue=duration(stats.queue),
            compute_input=duration(stats.compute_input), compute_infer=duration(stats.compute_infer),
            compute_output=duration(stats.compute_output)),
        batch_stats=[v2.InferBatchStatistics(batch_size=size, compute_input=duration(b.compute_input),
                                             compute_infer=duration(b.compute_infer),
                                             compute_output=duration(b.compute_output))
                     for size, b in sorted(stats.batches.items())])


def _one_repository(name: str) -> None:
    if name:
        raise invalid(f"repository {quote(name)}: this server has one repository, its --models-dir; "
                      "send repository_name empty")
