"""The Open Inference Protocol's HTTP tensors: a request body read into a plan, and an answer written.

A request body is JSON, or, with Triton's binary tensor extension, a JSON header of
``Inference-Header-Content-Length`` bytes followed by the input's bytes (``binary_data_size``).
``plan`` checks it against the model before anything is decoded, in the words of the gRPC front-end
(``server.open_inference``): the input ``image`` (UINT8 or FP32, N x 3 x 32 x 32) or
``encoded_image`` (BYTES, binary only), the output ``probabilities`` (with ``classification``: k
for top-k strings) and any layer by name (``datatype`` FP16, binary only). ``answer`` writes the
outputs back as JSON data or binary parts (``binary_data`` per output, ``binary_data_output`` for
all). Pure functions of the request and the model: the HTTP layer is ``server.http_api``.

Self-contained on purpose: a front-end never imports another (tests/test_imports.py), so the rules
that ``server.open_inference`` applies to protobuf messages are repeated here for JSON.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass

import numpy as np

from cifar10_serving.server.core import top_k
from cifar10_serving.server.errors import LIST_ITEMS, invalid, listing, quote
from cifar10_serving.server.models import LoadedModel

IMAGE = "image"  # UINT8 (0..255) or FP32 (0..1), [N, 3, 32, 32], RGB, channels first
ENCODED_IMAGE = "encoded_image"  # BYTES [N]: PNG or JPEG files, binary data only
PROBABILITIES = "probabilities"  # FP32 [N, classes]
CLASSIFICATION = "classification"  # output parameter on probabilities: k -> BYTES [N, k], best first
DATATYPE = "datatype"  # output parameter on a layer: "FP32" or "FP16" (binary only)
BINARY_DATA = "binary_data"  # output parameter: this output as binary data
BINARY_DATA_SIZE = "binary_data_size"  # input parameter: its bytes follow the JSON header
BINARY_DATA_OUTPUT = "binary_data_output"  # request parameter: every output as binary data
TIMEOUT = "timeout"  # request parameter (Triton's): the request's deadline, in microseconds
IMAGE_DTYPES = {"UINT8": np.dtype(np.uint8), "FP32": np.dtype("<f4")}
FEATURE_DTYPES = {"FP32": np.dtype("<f4"), "FP16": np.dtype("<f2")}
REQUEST_KEYS = ("id", "parameters", "inputs", "outputs")
INPUT_KEYS = ("name", "shape", "datatype", "parameters", "data")
OUTPUT_KEYS = ("name", "parameters")
_LENGTH = struct.Struct("<I")  # a binary BYTES element's length prefix, as Triton writes it


@dataclass(frozen=True)
class Output:
    name: str
    binary: bool
    top_k: int = 0  # > 0: the classification extension's k
    dtype: np.dtype = FEATURE_DTYPES["FP32"]


@dataclass(frozen=True)
class Plan:
    """A checked request: nothing decoded yet."""

    model: LoadedModel
    input: str  # IMAGE or ENCODED_IMAGE
    datatype: str
    images: int
    data: list | None  # the JSON data, or None: the input is ``binary``
    binary: bytes | memoryview | None
    outputs: tuple[Output, ...]
    request_id: str | None
    echo_bytes: int
    timeout_us: int | None

    @property
    def layers(self) -> tuple[str, ...]:
        return tuple(o.name for o in self.outputs if o.name != PROBABILITIES)


# ----------------------------------------------------------------------------- the body
def split(body: bytes, header_length: str | None) -> tuple[bytes | memoryview, memoryview]:
    """The JSON header and the binary data after it, by ``Inference-Header-Content-Length``."""
    if header_length is None:
        return body, memoryview(b"")
    if not header_length.isdigit() or int(header_length) > len(body):
        raise invalid(f"Inference-Header-Content-Length is {quote(header_length)}; send the JSON header's "
                      f"length in bytes, at most the body's {len(body):,}")
    view = memoryview(body)
    return view[: int(header_length)], view[int(header_length):]


def parse_json(text: bytes | memoryview) -> dict:
    """The JSON header; strict JSON (no NaN or Infinity), nesting bounded by Python's recursion limit."""
    try:
        document = json.loads(bytes(text), parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        message = str(exc) if not isinstance(exc, RecursionError) else "nested too deeply"
        raise invalid(f"the request is not valid JSON: {message[:200]}") from None
    if not isinstance(document, dict):
        raise invalid(f"the request is a JSON {type(document).__name__}; send an object with \"inputs\"")
    return document


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


# ----------------------------------------------------------------------------- plan
def plan(model: LoadedModel, document: dict, binary: memoryview, max_batch_size: int, echo) -> Plan:
    """The request checked against ``model``; ``echo(what, value)`` sizes the id (the core's check)."""
    _known_keys(document, REQUEST_KEYS, "the request")
    request_id = document.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise invalid("\"id\" must be a string")
    echo_bytes = echo("id", request_id) if request_id else 0
    params = _parameters(document, "the request")
    binary_output = _flag(params.pop(BINARY_DATA_OUTPUT, False), f"the request's {BINARY_DATA_OUTPUT!r}")
    timeout_us = params.pop(TIMEOUT, None)
    if timeout_us is not None and (not _is_int(timeout_us) or timeout_us <= 0):
        raise invalid(f"the request's {TIMEOUT!r} is {_shown(timeout_us)}; send microseconds, an integer > 0")
    _no_parameters(params, "the request")

    inputs = document.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1:
        count = f"{len(inputs)} input tensors" if isinstance(inputs, list) else "no \"inputs\" list"
        raise invalid(f"{count}; send one: {IMAGE!r} (UINT8 or FP32 [N, {', '.join(map(str, model.input_shape))}]) "
                      f"or {ENCODED_IMAGE!r} (BYTES [N], binary data)")
    tensor = inputs[0]
    if not isinstance(tensor, dict):
        raise invalid("inputs[0] must be a JSON object with name, shape, datatype and data")
    _known_keys(tensor, INPUT_KEYS, "inputs[0]")
    name, datatype, shape = tensor.get("name"), tensor.get("datatype"), tensor.get("shape")
    if not isinstance(name, str):
        raise invalid("inputs[0]: \"name\" must be a string")
    what = f"input {quote(name)}"
    n = _check_input(model, name, datatype, shape, max_batch_size)
    params = _parameters(tensor, what)
    size = params.pop(BINARY_DATA_SIZE, None)
    _no_parameters(params, what)
    if size is None:
        if "data" not in tensor:
            raise invalid(f"{what}: no \"data\"; send it, or its bytes after the JSON header with {BINARY_DATA_SIZE!r}")
        if len(binary):
            raise invalid(f"{len(binary):,} bytes after the JSON header, but no input has {BINARY_DATA_SIZE!r}")
        if name == ENCODED_IMAGE:
            raise invalid(f"{what}: image files travel as binary data; send them after the JSON header with "
                          f"{BINARY_DATA_SIZE!r} (each a 4-byte little-endian length, then the file)")
        data = tensor["data"]
        if not isinstance(data, list):
            raise invalid(f"{what}: \"data\" must be a JSON array")
        return Plan(model, name, datatype, n, data, None,
                    _outputs(model, document.get("outputs"), binary_output, typed=True),
                    request_id, echo_bytes, timeout_us)
    if not _is_int(size) or size != len(binary):
        raise invalid(f"{what}: {BINARY_DATA_SIZE!r} is {_shown(size)}, but {len(binary):,} bytes follow the JSON "
                      "header; send the input's size in bytes")
    if "data" in tensor:
        raise invalid(f"{what}: both \"data\" and {BINARY_DATA_SIZE!r}; send one")
    return Plan(model, name, datatype, n, None, binary,
                _outputs(model, document.get("outputs"), binary_output, typed=False),
                request_id, echo_bytes, timeout_us)


def _check_input(model: LoadedModel, name: str, datatype, shape, limit: int) -> int:
    if name == IMAGE:
        expected, dtypes, dtype_ok = [-1, *model.input_shape], "UINT8 or FP32", datatype in IMAGE_DTYPES
    elif name == ENCODED_IMAGE:
        expected, dtypes, dtype_ok = [-1], "BYTES", datatype == "BYTES"
    else:
        raise invalid(f"model {model.name!r} has no input {quote(name)}; its inputs: {IMAGE!r}, {ENCODED_IMAGE!r}")
    if not dtype_ok:
        shown = quote(datatype) if isinstance(datatype, str) else _shown(datatype)
        raise invalid(f"input {name!r}: datatype {shown}; send {dtypes}")
    if not isinstance(shape, list) or not all(_is_int(d) for d in shape[:len(expected) + 1]):
        raise invalid(f"input {name!r}: \"shape\" must be a list of integers, {_dims(expected)}")
    if len(shape) != len(expected) or shape[1:] != expected[1:]:
        raise invalid(f"input {name!r}: shape {listing(shape)}; expected {_dims(expected)}")
    if not 1 <= shape[0] <= limit:
        raise invalid(f"input {name!r}: {shape[0]} images; send 1 to {limit}, split a larger batch")
    return shape[0]


def _outputs(model: LoadedModel, requested, binary_output: bool, typed: bool) -> tuple[Output, ...]:
    if requested is None or requested == []:
        return (Output(PROBABILITIES, binary_output),)
    if not isinstance(requested, list):
        raise invalid("\"outputs\" must be a JSON array of objects with a \"name\"")
    if len(requested) > 1 + len(model.layer_names):  # its length first: more than there are repeats some
        raise invalid(f"{len(requested):,} outputs requested; model {model.name!r} has "
                      f"{1 + len(model.layer_names)}: {PROBABILITIES!r} and its layers")
    outputs, seen = [], set()
    for i, tensor in enumerate(requested):
        if not isinstance(tensor, dict) or not isinstance(tensor.get("name"), str):
            raise invalid(f"outputs[{i}] must be a JSON object with a string \"name\"")
        _known_keys(tensor, OUTPUT_KEYS, f"outputs[{i}]")
        name = tensor["name"]
        what = f"output {quote(name)}"
        if name in seen:
            raise invalid(f"{what} asked for twice")
        seen.add(name)
        params = _parameters(tensor, what)
        binary = _flag(params.pop(BINARY_DATA, binary_output), f"{what}: {BINARY_DATA!r}")
        if name == PROBABILITIES:
            k = _top_k(model, params.pop(CLASSIFICATION, None), what)
            _no_parameters(params, what)
            outputs.append(Output(name, binary, k))
        elif name in model.layer_names:
            dtype = params.pop(DATATYPE, "FP32")
            if dtype not in FEATURE_DTYPES:
                raise invalid(f"{what}: {DATATYPE!r} must be the string \"FP32\" or \"FP16\"")
            if dtype == "FP16" and not binary:
                raise invalid(f"{what}: FP16 travels only as binary data; set {BINARY_DATA!r}: true")
            if CLASSIFICATION in params:
                raise invalid(f"{what}: {CLASSIFICATION!r} applies to {PROBABILITIES!r} only")
            _no_parameters(params, what)
            outputs.append(Output(name, binary, dtype=FEATURE_DTYPES[dtype]))
        else:
            raise invalid(f"model {model.name!r} has no {what}; its outputs: {PROBABILITIES!r} and "
                          f"its layers, {', '.join(model.layer_names)}")
    return tuple(outputs)


def _top_k(model: LoadedModel, value, what: str) -> int:
    if value is None:
        return 0
    classes = len(model.class_names)
    if not _is_int(value) or not 1 <= value <= classes:
        raise invalid(f"{what}: {CLASSIFICATION!r} is {_shown(value)}; send an integer 1 to {classes}")
    return value


# ----------------------------------------------------------------------------- tensors in
def image_array(plan: Plan) -> np.ndarray:
    """The ``image`` input as N x C x H x W in its datatype; the core checks FP32's range."""
    dtype = IMAGE_DTYPES[plan.datatype]
    shape = (plan.images, *plan.model.input_shape)
    count = math.prod(shape)
    what = f"input {IMAGE!r}"
    if plan.binary is not None:
        if len(plan.binary) != count * dtype.itemsize:
            raise invalid(f"{what}: binary data is {len(plan.binary):,} bytes; shape {list(shape)} of "
                          f"{plan.datatype} needs {count * dtype.itemsize:,}")
        return np.frombuffer(plan.binary, dtype=dtype).reshape(shape)
    try:  # nested or flat, as the protocol allows; ragged nesting, strings and bools are refused below
        values = np.array(plan.data)
    except (ValueError, TypeError, OverflowError, RecursionError):
        raise invalid(f"{what}: \"data\" is not an array of numbers (ragged or mixed)") from None
    if values.size != count:
        raise invalid(f"{what}: {values.size:,} values in \"data\"; shape {list(shape)} needs {count:,}")
    if plan.datatype == "UINT8":
        if values.dtype.kind not in "iu" or (values.size and (values.min() < 0 or values.max() > 255)):
            raise invalid(f"{what}: UINT8 data must be integers in 0..255")
        return values.astype(np.uint8).reshape(shape)
    if values.dtype.kind not in "iuf":
        raise invalid(f"{what}: FP32 data must be numbers")
    return values.astype(dtype).reshape(shape)


def encoded_files(plan: Plan) -> list[bytes]:
    """The elements of the binary ``encoded_image`` input: a 4-byte little-endian length, then the file."""
    raw, n, what = plan.binary, plan.images, f"input {ENCODED_IMAGE!r}"
    files, offset = [], 0
    for i in range(n):
        if offset + _LENGTH.size > len(raw):
            raise invalid(f"{what}: binary data ends before element {i} of {n} (each element is a 4-byte "
                          "little-endian length, then that many bytes)")
        (length,) = _LENGTH.unpack_from(raw, offset)
        offset += _LENGTH.size
        if offset + length > len(raw):
            raise invalid(f"{what}: element {i} declares {length:,} bytes; {len(raw) - offset:,} remain")
        files.append(bytes(raw[offset: offset + length]))
        offset += length
    if offset != len(raw):
        raise invalid(f"{what}: {len(raw) - offset:,} bytes after the last of {n} elements")
    return files


# ----------------------------------------------------------------------------- tensors out
def answer(plan: Plan, probabilities: np.ndarray, features: dict[str, np.ndarray]) -> tuple[bytes, int | None]:
    """The response body and, when some output is binary, the JSON header's length
    (``Inference-Header-Content-Length``); the outputs in the order asked."""
    model = plan.model
    header: dict = {"model_name": model.name, "model_version": model.version}
    if plan.request_id:
        header["id"] = plan.request_id
    outputs, parts = [], []
    for output in plan.outputs:
        if output.name == PROBABILITIES and output.top_k:
            datatype, array = "BYTES", classification(model, probabilities, output.top_k)
        elif output.name == PROBABILITIES:
            datatype, array = "FP32", probabilities.astype("<f4", copy=False)
        else:
            array = features[output.name].astype(output.dtype, copy=False)
            datatype = "FP16" if output.dtype == FEATURE_DTYPES["FP16"] else "FP32"
        tensor = {"name": output.name, "datatype": datatype, "shape": list(array.shape)}
        if output.binary:
            data = (b"".join(_LENGTH.pack(len(s)) + s for s in array.ravel()) if datatype == "BYTES"
                    else np.ascontiguousarray(array).tobytes())
            tensor["parameters"] = {BINARY_DATA_SIZE: len(data)}
            parts.append(data)
        elif datatype == "BYTES":
            tensor["data"] = [s.decode() for s in array.ravel()]
        else:
            tensor["data"] = array.ravel().tolist()  # float32 -> the double of the same value: exact
        outputs.append(tensor)
    header["outputs"] = outputs
    text = json.dumps(header, separators=(",", ":")).encode()
    if not parts:
        return text, None
    return b"".join((text, *parts)), len(text)


def classification(model: LoadedModel, probabilities: np.ndarray, k: int) -> np.ndarray:
    """Triton's classification extension: the k best classes of each image, best first, as
    ``b"score:index:label"``, the score float32's shortest exact decimal form (as on gRPC)."""
    order = top_k(probabilities, k)
    rows = [[f"{probs[j]!s}:{j}:{model.class_names[j]}".encode() for j in best]
            for probs, best in zip(probabilities, order)]
    array = np.empty((len(rows), k), dtype=object)
    array[:] = rows
    return array


# ----------------------------------------------------------------------------- metadata
def model_metadata(model: LoadedModel, platform: str) -> dict:
    """Inputs (send one of them) and outputs: probabilities, and every layer as an optional output."""
    layers = {row["name"]: row["output_shape"] for row in model.metadata["layers"]}
    return {"name": model.name, "versions": [model.version], "platform": platform,
            "inputs": [{"name": IMAGE, "datatype": "UINT8", "shape": [-1, *model.input_shape]},
                       {"name": ENCODED_IMAGE, "datatype": "BYTES", "shape": [-1]}],
            "outputs": [{"name": PROBABILITIES, "datatype": "FP32", "shape": [-1, len(model.class_names)]},
                        *({"name": name, "datatype": "FP32", "shape": [-1, *shape]} for name, shape in layers.items())]}


# ----------------------------------------------------------------------------- helpers
def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _flag(value, what: str) -> bool:
    if not isinstance(value, bool):
        raise invalid(f"{what} is {_shown(value)}; send true or false")
    return value


def _shown(value) -> str:
    text = json.dumps(value) if isinstance(value, (bool, int, float, type(None))) else type(value).__name__
    return quote(value) if isinstance(value, str) else text[:40]


def _parameters(obj: dict, what: str) -> dict:
    params = obj.get("parameters", {})
    if not isinstance(params, dict):
        raise invalid(f"{what}: \"parameters\" must be a JSON object")
    return dict(params)


def _no_parameters(params: dict, what: str) -> None:
    """Parameters this server does not know are refused, so a typo or an unsupported feature (shared
    memory, sequences, priorities) does not pass unnoticed. The message names a few."""
    if params:
        first = [name for name, _ in zip(params, range(LIST_ITEMS))]
        more = f", ... ({len(params):,} parameters)" if len(params) > LIST_ITEMS else ""
        raise invalid(f"{what}: parameter {', '.join(quote(n) for n in sorted(first))}{more} not offered by this server")


def _known_keys(obj: dict, known: tuple[str, ...], what: str) -> None:
    unknown = [key for key in obj if key not in known]
    if unknown:
        raise invalid(f"{what}: unknown field {quote(unknown[0])}; the fields are {', '.join(known)}")


def _dims(shape: list[int]) -> str:
    return "[" + ", ".join("N" if d == -1 else str(d) for d in shape) + "]"
