"""The Open Inference Protocol's rules, once for both of its transports.

What a v2 request may say and what its answer holds, whichever way it travels: the input tensors
(``image``, ``encoded_image``), their datatypes, shapes and batch limit; the outputs (``probabilities``,
the classification extension's top-k strings, each layer with its ``datatype`` parameter, and the
explanations ``saliency`` and ``grad_cam`` with ``class_index`` and ``layer``); parameters nobody
offers refused; model metadata, model configuration, statistics and the repository calls' rules.

Protocol-free: no protobuf message and no HTTP type. Each front-end reads its framing into Python
values (``server.open_inference``: protobuf fields; ``server.http_tensors``: JSON and binary parts),
calls these, and writes what they return back in its framing. A rule fixed here is fixed for both.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from cifar10_serving.server.batching import batch_ladder
from cifar10_serving.server.core import top_k
from cifar10_serving.server.errors import LIST_ITEMS, Code, Rejection, invalid, listing, quote
from cifar10_serving.server.explain import INPUT, Maps
from cifar10_serving.server.models import LoadedModel, ModelLoadError

SERVER_NAME = "cifar10-serving"
PLATFORM = "pytorch_torchscript"

IMAGE = "image"  # UINT8 (0..255) or FP32 (0..1), [N, 3, 32, 32], RGB, channels first
ENCODED_IMAGE = "encoded_image"  # BYTES [N]: one PNG or JPEG file each, scaled and centre-cropped to 32x32
PROBABILITIES = "probabilities"  # FP32 [N, classes]: softmax scores in class index order
SALIENCY = "saliency"  # FP32 [N, H, W]: the explanation path's saliency maps (server.explain)
GRAD_CAM = "grad_cam"  # FP32 [N, H, W]: Grad-CAM at a layer, scaled to the input's size
EXPLANATIONS = (SALIENCY, GRAD_CAM)
TENSOR_NAMES = (IMAGE, ENCODED_IMAGE, PROBABILITIES, *EXPLANATIONS)  # a model's layers may not take them

CLASSIFICATION = "classification"  # output parameter on probabilities: k -> BYTES [N, k], best first
DATATYPE = "datatype"  # output parameter on a layer: "FP32" (the default) or "FP16", raw/binary only
CLASS_INDEX = "class_index"  # on an explanation: the class explained (asked: every image; answered: if one)
CLASS_INDICES = "class_indices"  # answered on an explanation: each image's class, comma-separated
LAYER = "layer"  # on grad_cam: the layer it is taken at (asked, or the default; answered always)
UNLOAD_DEPENDENTS = "unload_dependents"  # tritonclient always sends it; this server has no ensembles
# perf_analyzer sends Triton's flag for decoupled models, which answer a request more than once; this
# server answers each request once, so the flag changes nothing. Any other request parameter is refused.
IGNORED_PARAMETERS = ("triton_enable_empty_final_response",)

IMAGE_DTYPES = {"UINT8": np.dtype(np.uint8), "FP32": np.dtype("<f4")}
FEATURE_DTYPES = {"FP32": np.dtype("<f4"), "FP16": np.dtype("<f2")}
LENGTH = struct.Struct("<I")  # a BYTES element's length prefix, raw (gRPC) or binary (HTTP)


@dataclass(frozen=True)
class Output:
    """One requested output: probabilities (``top_k`` > 0: the classification extension's k), a
    layer (in ``dtype``) or an explanation. ``raw``: as bytes (gRPC raw contents, HTTP binary data)."""

    name: str
    raw: bool = False
    top_k: int = 0
    dtype: np.dtype = FEATURE_DTYPES["FP32"]


@dataclass(frozen=True)
class Explanation:
    """What a request's explanation outputs ask of the explanation path."""

    target: int | None  # the class explained for every image; None: each image's top class
    layer: str  # Grad-CAM's layer; "": the model's default


@dataclass(frozen=True)
class Outputs:
    outputs: tuple[Output, ...]
    explanation: Explanation | None = None  # set: some outputs are explanations

    @property
    def layers(self) -> tuple[str, ...]:
        return tuple(o.name for o in self.outputs if o.name not in (PROBABILITIES, *EXPLANATIONS))

    @property
    def inference(self) -> bool:
        """Whether any output comes from the inference path (probabilities or a layer)."""
        return any(o.name not in EXPLANATIONS for o in self.outputs)

    def in_order(self, tensors: list[Tensor]) -> list[Tensor]:
        """``tensors`` of both paths in the order the request asked for their outputs."""
        order = {o.name: i for i, o in enumerate(self.outputs)}
        return sorted(tensors, key=lambda t: order[t.output.name])


@dataclass(frozen=True)
class Tensor:
    """One output of an answer, for a front-end to frame: its array and its parameters."""

    output: Output
    datatype: str  # "FP32", "FP16" or "BYTES" (then ``array`` holds bytes objects)
    array: np.ndarray
    parameters: dict = field(default_factory=dict)  # name -> bool, int or str


# ----------------------------------------------------------------------------- inputs
def check_input(model: LoadedModel, name: str, datatype, shape: Sequence, limit: int) -> int:
    """The input's name, datatype and shape against ``model``; returns its number of images.
    ``shape`` may be a protobuf repeated field: its length is read before its elements."""
    if name == IMAGE:
        dtype_ok = isinstance(datatype, str) and datatype in IMAGE_DTYPES  # a JSON list is no key
        expected, dtypes = [-1, *model.input_shape], "UINT8 or FP32"
    elif name == ENCODED_IMAGE:
        # [N], or [N, 1] as Triton's clients send it from ModelConfig's dims [1] (reshaped to [N])
        expected, dtypes, dtype_ok = [-1, 1] if len(shape) == 2 else [-1], "BYTES", datatype == "BYTES"
    else:
        raise invalid(f"model {model.name!r} has no input {quote(name)}; its inputs: {IMAGE!r}, {ENCODED_IMAGE!r}")
    if not dtype_ok:
        raise invalid(f"input {name!r}: datatype {shown(datatype)}; send {dtypes}")
    if not all(is_int(d) for d in shape[:len(expected) + 1]):
        raise invalid(f"input {name!r}: \"shape\" must be a list of integers, {dims(expected)}")
    if len(shape) != len(expected) or list(shape[1:]) != expected[1:]:  # its length first: a shape of millions is refused unread
        raise invalid(f"input {name!r}: shape {listing(shape)}; expected {dims(expected)}")
    if not 1 <= shape[0] <= limit:
        raise invalid(f"input {name!r}: {shape[0]} images; send 1 to {limit}, split a larger batch")
    return int(shape[0])


def image_from_bytes(data: bytes | memoryview, datatype: str, images: int, model: LoadedModel,
                     where: str) -> np.ndarray:
    """The ``image`` input sent as bytes, N x C x H x W in its datatype; ``where`` names them in
    errors ("raw contents are", "binary data is"). The core checks FP32's range."""
    dtype = IMAGE_DTYPES[datatype]
    shape = (images, *model.input_shape)
    needed = math.prod(shape) * dtype.itemsize
    if len(data) != needed:
        raise invalid(f"input {IMAGE!r}: {where} {len(data):,} bytes; shape {list(shape)} of {datatype} "
                      f"needs {needed:,}")
    return np.frombuffer(data, dtype=dtype).reshape(shape)


def image_from_values(values: np.ndarray, datatype: str, shape: tuple[int, ...]) -> np.ndarray:
    """The ``image`` input sent as numbers (typed contents, JSON data), already counted: UINT8 must
    be integers in range, FP32 numbers (the core checks their range)."""
    if datatype == "UINT8":
        if values.dtype.kind not in "iu" or (values.size and (values.min() < 0 or values.max() > 255)):
            raise invalid(f"input {IMAGE!r}: UINT8 values must be integers in 0..255")
        return values.astype(np.uint8).reshape(shape)
    if values.dtype.kind not in "iuf":
        raise invalid(f"input {IMAGE!r}: FP32 values must be numbers")
    return values.astype(IMAGE_DTYPES[datatype]).reshape(shape)


def bytes_elements(data: bytes | memoryview, n: int, where: str) -> list[bytes]:
    """The ``n`` elements of a BYTES input sent as bytes: each a 4-byte little-endian length, then
    that many bytes; ``where`` names them in errors ("raw contents", "binary data")."""
    what = f"input {ENCODED_IMAGE!r}"
    files, offset = [], 0
    for i in range(n):
        if offset + LENGTH.size > len(data):
            raise invalid(f"{what}: the {where} end before element {i} of {n} (each element is a 4-byte "
                          "little-endian length, then that many bytes)")
        (length,) = LENGTH.unpack_from(data, offset)
        offset += LENGTH.size
        if offset + length > len(data):
            raise invalid(f"{what}: element {i} declares {length:,} bytes; {len(data) - offset:,} remain "
                          f"in the {where}")
        files.append(bytes(data[offset: offset + length]))
        offset += length
    if offset != len(data):
        raise invalid(f"{what}: {len(data) - offset:,} bytes after the last of {n} elements")
    return files


def with_input_name(rejection: Rejection) -> Rejection:
    """A decoding refusal of ``encoded_image``, naming the tensor."""
    if rejection.code is Code.INVALID_ARGUMENT:
        return invalid(f"input {ENCODED_IMAGE!r}: {rejection.message}")
    return rejection


# ----------------------------------------------------------------------------- outputs
Read = Callable[[int, object], "tuple[str, dict, bool]"]


def plan_outputs(model: LoadedModel, requested: Sequence, read: Read, *, default_raw: bool, raw_words: str,
                 explain: dict | None = None) -> Outputs:
    """The outputs a request asks for, checked. ``read(i, item)`` gives an item's name, its
    parameters as Python values, and whether it travels as bytes; ``raw_words`` says how to send
    those (for FP16's refusal); ``explain``: the request's own ``class_index`` and ``layer``
    (``request_parameters``), which apply to its explanation outputs. None asked: the scores."""
    explain = explain or {}
    if not requested:
        _explanations_only(explain)
        return Outputs((Output(PROBABILITIES, default_raw),))
    offered = 1 + len(EXPLANATIONS) + len(model.layer_names)
    if len(requested) > offered:  # its length first: more than there are repeats some
        raise invalid(f"{len(requested):,} outputs requested; model {model.name!r} has {offered}: "
                      f"{PROBABILITIES!r}, {SALIENCY!r}, {GRAD_CAM!r} and its layers")
    outputs: list[Output] = []
    seen: set[str] = set()
    targets: dict[str, int] = {}
    if CLASS_INDEX in explain:
        targets["the request"] = _class_index(model, explain[CLASS_INDEX], "the request")
    layer = explain.get(LAYER, "")
    if not isinstance(layer, str):
        raise invalid(f"the request: {LAYER!r} is {shown(layer)}; send a layer's name (ModelMetadata's outputs)")
    for i, item in enumerate(requested):
        name, params, raw = read(i, item)
        what = f"output {quote(name)}"
        if name in seen:
            raise invalid(f"{what} asked for twice")
        seen.add(name)
        if name == PROBABILITIES:
            k = _top_k(model, params.pop(CLASSIFICATION, None), what)
            no_parameters(params, what)
            outputs.append(Output(name, raw, top_k=k))
        elif name in model.layer_names:
            dtype = _feature_dtype(params.pop(DATATYPE, None), what, raw, raw_words)
            if CLASSIFICATION in params:
                raise invalid(f"{what}: {CLASSIFICATION!r} applies to {PROBABILITIES!r} only")
            no_parameters(params, what)
            outputs.append(Output(name, raw, dtype=dtype))
        elif name in EXPLANATIONS:
            if CLASS_INDEX in params:
                targets[name] = _class_index(model, params.pop(CLASS_INDEX), what)
            if LAYER in params and name != GRAD_CAM:
                raise invalid(f"{what}: {LAYER!r} applies to {GRAD_CAM!r} only; saliency is taken at the input")
            if LAYER in params:
                asked = params.pop(LAYER)
                if not isinstance(asked, str) or not asked or (layer and asked != layer):
                    raise invalid(f"{what}: {LAYER!r} is {shown(asked)}; send a layer's name (ModelMetadata's "
                                  "outputs), the request's if it sends one")
                layer = asked
            no_parameters(params, what)
            outputs.append(Output(name, raw))
        else:
            raise invalid(f"model {model.name!r} has no {what}; its outputs: {PROBABILITIES!r}, {SALIENCY!r}, "
                          f"{GRAD_CAM!r} and its layers, {', '.join(model.layer_names)}")
    explained = [o.name for o in outputs if o.name in EXPLANATIONS]
    if not explained:
        _explanations_only(explain)
        return Outputs(tuple(outputs))
    # With inference outputs too (perf_analyzer asks for every output ModelMetadata lists), both paths
    # answer, each with its own limits and reservation, and the outputs come back in the order asked.
    if len(set(targets.values())) > 1:
        raise invalid(f"{SALIENCY!r} and {GRAD_CAM!r} come from one backward pass: send one {CLASS_INDEX!r} "
                      "(on either, or the same on both)")
    return Outputs(tuple(outputs), Explanation(next(iter(targets.values()), None), layer))


def _explanations_only(explain: dict) -> None:
    if explain:
        raise invalid(f"the request: parameter {', '.join(map(repr, explain))} applies to the outputs {SALIENCY!r} "
                      f"and {GRAD_CAM!r} only; ask for one of them")


def _top_k(model: LoadedModel, value, what: str) -> int:
    if value is None:
        return 0
    classes = len(model.class_names)
    if not is_int(value) or not 1 <= value <= classes:
        raise invalid(f"{what}: {CLASSIFICATION!r} is {shown(value)}; send an integer 1 to {classes}")
    return value


def _feature_dtype(value, what: str, raw: bool, raw_words: str) -> np.dtype:
    if value is None:
        return FEATURE_DTYPES["FP32"]
    if not isinstance(value, str) or value not in FEATURE_DTYPES:
        raise invalid(f"{what}: {DATATYPE!r} must be the string \"FP32\" or \"FP16\"")
    if value == "FP16" and not raw:
        raise invalid(f"{what}: FP16 travels only as {raw_words}")
    return FEATURE_DTYPES[value]


def _class_index(model: LoadedModel, value, what: str) -> int:
    classes = len(model.class_names)
    if not is_int(value) or not 0 <= value < classes:
        raise invalid(f"{what}: {CLASS_INDEX!r} is {shown(value)}; send an integer 0 to {classes - 1}")
    return value


def request_parameters(params) -> dict:
    """The request's own parameters, as Python values: ``class_index`` and ``layer`` (for the
    explanation outputs; tritonclient's ``infer(parameters=...)`` sets them) are returned, those of
    ``IGNORED_PARAMETERS`` pass, any other is refused. ``params``: a map of millions is refused unread."""
    if len(params) > LIST_ITEMS:
        no_parameters(params, "the request")
    params = {k: v for k, v in params.items() if k not in IGNORED_PARAMETERS}
    explain = {k: params.pop(k) for k in (CLASS_INDEX, LAYER) if k in params}
    no_parameters(params, "the request")
    return explain


def no_parameters(params, what: str) -> None:
    """Parameters this server does not know are refused, so that a typo or an unsupported feature
    (shared memory, sequences, priorities) does not pass unnoticed. The message names a few."""
    if params:
        first = [name for name, _ in zip(params, range(LIST_ITEMS))]
        more = f", ... ({len(params):,} parameters)" if len(params) > LIST_ITEMS else ""
        raise invalid(f"{what}: parameter {', '.join(quote(n) for n in sorted(first))}{more} not offered by this server")


# ----------------------------------------------------------------------------- answers
def inference_tensors(model: LoadedModel, outputs: Outputs, probabilities: np.ndarray,
                      features: dict[str, np.ndarray]) -> list[Tensor]:
    """The inference path's outputs, in the order asked."""
    tensors = []
    for output in outputs.outputs:
        if output.name in EXPLANATIONS:
            continue  # the explanation path's
        if output.name == PROBABILITIES and output.top_k:
            tensors.append(Tensor(output, "BYTES", classification(model, probabilities, output.top_k)))
        elif output.name == PROBABILITIES:
            tensors.append(Tensor(output, "FP32", probabilities.astype("<f4", copy=False)))
        else:
            datatype = "FP16" if output.dtype == FEATURE_DTYPES["FP16"] else "FP32"
            tensors.append(Tensor(output, datatype, features[output.name].astype(output.dtype, copy=False)))
    return tensors


def explanation_tensors(outputs: Outputs, maps: Maps, layer: str) -> list[Tensor]:
    """The explanation path's outputs, in the order asked, each with the class it explains
    (``class_index`` when one class covers the batch, ``class_indices`` always) and its layer."""
    classes = [int(c) for c in maps.classes]
    common = {CLASS_INDEX: classes[0]} if len(set(classes)) == 1 else {}
    indices = ",".join(map(str, classes))
    tensors = []
    for output in (o for o in outputs.outputs if o.name in EXPLANATIONS):
        array, at = (maps.saliency, INPUT) if output.name == SALIENCY else (maps.grad_cam, layer)
        tensors.append(Tensor(output, "FP32", np.ascontiguousarray(array, dtype="<f4"),
                              {**common, CLASS_INDICES: indices, LAYER: at}))
    return tensors


def pack_bytes(array: np.ndarray) -> bytes:
    """A BYTES tensor's elements as bytes: each a 4-byte little-endian length, then the element."""
    return b"".join(LENGTH.pack(len(s)) + s for s in array.ravel())


def classification(model: LoadedModel, probabilities: np.ndarray, k: int) -> np.ndarray:
    """Triton's classification extension: the k best classes of each image, best first, as
    ``b"score:index:label"``; the score is the float32 probability's shortest exact decimal form."""
    order = top_k(probabilities, k)  # cifar10.v1's top_k order
    rows = [[f"{probs[j]!s}:{j}:{model.class_names[j]}".encode() for j in best]  # !s: float32's own str
            for probs, best in zip(probabilities, order)]
    array = np.empty((len(rows), k), dtype=object)
    array[:] = rows
    return array


# ----------------------------------------------------------------------------- what the server says of a model
def check_names(model: LoadedModel) -> None:
    """A model whose layers take the protocol's tensor names cannot be served (a load-time check)."""
    taken = set(TENSOR_NAMES) & set(model.layer_names)
    if taken:
        raise ModelLoadError(f"model {model.name!r}: layer names {sorted(taken)} are the v2 API's tensor names")


def model_metadata(model: LoadedModel, versions: Sequence[str] | None = None) -> dict:
    """Inputs (send one of them) and outputs: probabilities, every layer and the two explanations,
    each one optional; ``versions``: those listed (default: the model's own)."""
    h, w = model.input_shape[1:]
    layers = {row["name"]: row["output_shape"] for row in model.metadata["layers"]}
    return {"name": model.name, "versions": list(versions or [model.version]), "platform": PLATFORM,
            "inputs": [{"name": IMAGE, "datatype": "UINT8", "shape": [-1, *model.input_shape]},
                       {"name": ENCODED_IMAGE, "datatype": "BYTES", "shape": [-1, 1]}],  # [N] is taken too
            "outputs": [{"name": PROBABILITIES, "datatype": "FP32", "shape": [-1, len(model.class_names)]},
                        *({"name": name, "datatype": "FP32", "shape": [-1, *shape]} for name, shape in layers.items()),
                        *({"name": name, "datatype": "FP32", "shape": [-1, h, w]} for name in EXPLANATIONS)]}


def model_config(model: LoadedModel, config, instances: int, device_type: str) -> dict:
    """Triton's configuration of one model as this server runs it, in Triton's JSON form (the
    protobuf message's field and enum names): inputs (both optional, since a request sends one of
    them), every output, the batching settings and the instances."""
    h, w = model.input_shape[1:]
    layers = {row["name"]: row["output_shape"] for row in model.metadata["layers"]}
    chosen = config.policy
    if chosen.kind == "all":
        policy: dict = {"all": {}}
    elif chosen.kind == "specific":  # Triton's versions are numbers: others are not listed
        policy = {"specific": {"versions": [int(v) for v in chosen.versions if v.isdigit()]}}
    else:
        policy = {"latest": {"num_versions": chosen.count}}
    return {
        "name": model.name, "platform": PLATFORM, "backend": "pytorch", "version_policy": policy,
        "max_batch_size": config.max_batch_size,
        "input": [{"name": IMAGE, "data_type": "TYPE_UINT8", "format": "FORMAT_NCHW",
                   "dims": list(model.input_shape), "optional": True},
                  # [N, 1]: perf_analyzer sets an optional input's shape from dims
                  {"name": ENCODED_IMAGE, "data_type": "TYPE_STRING", "dims": [1], "optional": True}],
        "output": [{"name": PROBABILITIES, "data_type": "TYPE_FP32", "dims": [len(model.class_names)]},
                   *({"name": n, "data_type": "TYPE_FP32", "dims": list(shape)} for n, shape in layers.items()),
                   *({"name": n, "data_type": "TYPE_FP32", "dims": [h, w]} for n in EXPLANATIONS)],
        "dynamic_batching": {"preferred_batch_size": list(batch_ladder(config.max_batch_size)),
                             "max_queue_delay_microseconds": config.max_queue_delay_us},
        "instance_group": [{"name": f"{model.name}_0", "kind": "KIND_GPU" if device_type == "cuda" else "KIND_CPU",
                            "count": instances}],
        "default_model_filename": model.path.name}


def model_statistics(version) -> dict:
    """One version's statistics (``server.statistics``) in Triton's JSON form."""
    stats = version.statistics

    def duration(d) -> dict:
        return {"count": d.count, "ns": d.ns}

    return {"name": version.name, "version": version.version, "last_inference": stats.last_inference_ms,
            "inference_count": stats.inference_count, "execution_count": stats.execution_count,
            "inference_stats": {name: duration(getattr(stats, name)) for name in
                                ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output")},
            "batch_stats": [{"batch_size": size, "compute_input": duration(b.compute_input),
                             "compute_infer": duration(b.compute_infer), "compute_output": duration(b.compute_output)}
                            for size, b in sorted(stats.batches.items())]}


def repository_index(versions) -> list[dict]:
    """The repository's index (``Repository.index``) as Triton lists it: empty fields left out."""
    return [{key: value for key, value in (("name", v.name), ("version", v.version), ("state", v.state),
                                           ("reason", v.reason)) if value} for v in versions]


# ----------------------------------------------------------------------------- repository calls
def check_change(mode: str, method: str, parameters: dict, repository_name: str = "") -> None:
    """A load or an unload: explicit mode only, the one repository, no parameters but unload's
    ``unload_dependents`` (no configuration and no file: loading runs the file's code, so only what
    the operator put there may run). The model's name is the repository's to check."""
    if mode != "explicit":
        raise Rejection(Code.FAILED_PRECONDITION, f"the server was started with --model-control-mode {mode}; "
                        "loading and unloading by call needs explicit")
    one_repository(repository_name)
    parameters = dict(parameters)
    if method == "RepositoryModelUnload" and UNLOAD_DEPENDENTS in parameters:
        if not isinstance(parameters.pop(UNLOAD_DEPENDENTS), bool):
            raise invalid(f"{method}: {UNLOAD_DEPENDENTS!r} must be a bool")
    no_parameters(parameters, method)


def one_repository(name: str) -> None:
    if name:
        raise invalid(f"repository {quote(name)}: this server has one repository, its --models-dir; "
                      "send repository_name empty")


# ----------------------------------------------------------------------------- helpers
def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def shown(value) -> str:
    """A caller's value for a message, bounded: a string quoted, a number or flag as JSON, else its type."""
    if isinstance(value, str):
        return quote(value)
    if isinstance(value, (bool, int, float, type(None))):
        return json.dumps(value)[:40]
    return type(value).__name__


def dims(shape: list[int]) -> str:
    return "[" + ", ".join("N" if d == -1 else str(d) for d in shape) + "]"
