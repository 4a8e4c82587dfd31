"""The Open Inference Protocol's HTTP tensors: a request body read into a plan, and an answer written.

A request body is JSON, or, with Triton's binary tensor extension, a JSON header of
``Inference-Header-Content-Length`` bytes followed by the input's bytes (``binary_data_size``).
``plan`` reads it and checks it by the protocol's rules (``server.v2_tensors``, shared with the gRPC
front-end) before anything is decoded; ``answer`` writes the outputs back as JSON data or binary
parts (``binary_data`` per output, ``binary_data_output`` for all). What is HTTP's alone lives here:
the JSON's shape, the binary framing, the request's ``timeout``. Pure functions of the request and
the model: the HTTP layer is ``server.http_api``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np

from cifar10_serving.server import v2_tensors as rules
from cifar10_serving.server.errors import invalid, quote
from cifar10_serving.server.models import LoadedModel
from cifar10_serving.server.v2_tensors import ENCODED_IMAGE, IMAGE, is_int, shown

BINARY_DATA = "binary_data"  # output parameter: this output as binary data
BINARY_DATA_SIZE = "binary_data_size"  # input parameter: its bytes follow the JSON header
BINARY_DATA_OUTPUT = "binary_data_output"  # request parameter: every output as binary data
TIMEOUT = "timeout"  # request parameter (Triton's): the request's deadline, in microseconds
REQUEST_KEYS = ("id", "parameters", "inputs", "outputs")
INPUT_KEYS = ("name", "shape", "datatype", "parameters", "data")
OUTPUT_KEYS = ("name", "parameters")
RAW_WORDS = f"binary data; set {BINARY_DATA!r}: true"  # how FP16 outputs must travel


@dataclass(frozen=True)
class Plan:
    """A checked request: nothing decoded yet."""

    model: LoadedModel
    input: str  # IMAGE or ENCODED_IMAGE
    datatype: str
    images: int
    data: list | None  # the JSON data, or None: the input is ``binary``
    binary: bytes | memoryview | None
    outputs: rules.Outputs
    request_id: str | None
    echo_bytes: int
    timeout_us: int | None

    @property
    def layers(self) -> tuple[str, ...]:
        return self.outputs.layers


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


def parse_json(text: bytes | memoryview, what: str = "the request", expect: str = "with \"inputs\"") -> dict:
    """A JSON object; strict JSON (no NaN or Infinity), nesting bounded by Python's recursion limit."""
    try:
        document = json.loads(bytes(text), parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        message = str(exc) if not isinstance(exc, RecursionError) else "nested too deeply"
        raise invalid(f"{what} is not valid JSON: {message[:200]}") from None
    if not isinstance(document, dict):
        raise invalid(f"{what} is a JSON {type(document).__name__}; send an object {expect}")
    return document


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


# ----------------------------------------------------------------------------- plan
def plan(model: LoadedModel, document: dict, binary: memoryview, max_batch_size: int, echo) -> Plan:
    """The request checked against ``model``; ``echo(what, value)`` sizes the id (the core's check)."""
    known_keys(document, REQUEST_KEYS, "the request")
    request_id = document.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise invalid("\"id\" must be a string")
    echo_bytes = echo("id", request_id) if request_id else 0
    params = parameters(document, "the request")
    binary_output = _flag(params.pop(BINARY_DATA_OUTPUT, False), f"the request's {BINARY_DATA_OUTPUT!r}")
    timeout_us = params.pop(TIMEOUT, None)
    if timeout_us is not None and (not is_int(timeout_us) or timeout_us <= 0):
        raise invalid(f"the request's {TIMEOUT!r} is {shown(timeout_us)}; send microseconds, an integer > 0")
    explain = rules.request_parameters(params)

    inputs = document.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1:
        count = f"{len(inputs)} input tensors" if isinstance(inputs, list) else "no \"inputs\" list"
        raise invalid(f"{count}; send one: {IMAGE!r} (UINT8 or FP32 [N, {', '.join(map(str, model.input_shape))}]) "
                      f"or {ENCODED_IMAGE!r} (BYTES [N], binary data)")
    tensor = inputs[0]
    if not isinstance(tensor, dict):
        raise invalid("inputs[0] must be a JSON object with name, shape, datatype and data")
    known_keys(tensor, INPUT_KEYS, "inputs[0]")
    name, datatype, shape = tensor.get("name"), tensor.get("datatype"), tensor.get("shape")
    if not isinstance(name, str):
        raise invalid("inputs[0]: \"name\" must be a string")
    what = f"input {quote(name)}"
    if not isinstance(shape, list):
        raise invalid(f"{what}: \"shape\" must be a list of integers")
    n = rules.check_input(model, name, datatype, shape, max_batch_size)
    params = parameters(tensor, what)
    size = params.pop(BINARY_DATA_SIZE, None)
    rules.no_parameters(params, what)
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
        return Plan(model, name, datatype, n, data, None, _outputs(model, document.get("outputs"), binary_output, explain),
                    request_id, echo_bytes, timeout_us)
    if not is_int(size) or size != len(binary):
        raise invalid(f"{what}: {BINARY_DATA_SIZE!r} is {shown(size)}, but {len(binary):,} bytes follow the JSON "
                      "header; send the input's size in bytes")
    if "data" in tensor:
        raise invalid(f"{what}: both \"data\" and {BINARY_DATA_SIZE!r}; send one")
    return Plan(model, name, datatype, n, None, binary, _outputs(model, document.get("outputs"), binary_output, explain),
                request_id, echo_bytes, timeout_us)


def _outputs(model: LoadedModel, requested, binary_output: bool, explain: dict) -> rules.Outputs:
    if requested is not None and not isinstance(requested, list):
        raise invalid("\"outputs\" must be a JSON array of objects with a \"name\"")

    def read(i: int, tensor) -> tuple[str, dict, bool]:
        if not isinstance(tensor, dict) or not isinstance(tensor.get("name"), str):
            raise invalid(f"outputs[{i}] must be a JSON object with a string \"name\"")
        known_keys(tensor, OUTPUT_KEYS, f"outputs[{i}]")
        what = f"output {quote(tensor['name'])}"
        params = parameters(tensor, what)
        return tensor["name"], params, _flag(params.pop(BINARY_DATA, binary_output), f"{what}: {BINARY_DATA!r}")

    return rules.plan_outputs(model, requested or [], read, default_raw=binary_output, raw_words=RAW_WORDS,
                              explain=explain)


# ----------------------------------------------------------------------------- tensors in
def image_array(plan: Plan) -> np.ndarray:
    """The ``image`` input as N x C x H x W in its datatype; the core checks FP32's range."""
    if plan.binary is not None:
        return rules.image_from_bytes(plan.binary, plan.datatype, plan.images, plan.model, "binary data is")
    shape = (plan.images, *plan.model.input_shape)
    count = math.prod(shape)
    try:  # nested or flat, as the protocol allows; ragged nesting, strings and bools are refused below
        values = np.array(plan.data)
    except (ValueError, TypeError, OverflowError, RecursionError):
        raise invalid(f"input {IMAGE!r}: \"data\" is not an array of numbers (ragged or mixed)") from None
    if values.size != count:
        raise invalid(f"input {IMAGE!r}: {values.size:,} values in \"data\"; shape {list(shape)} needs {count:,}")
    return rules.image_from_values(values, plan.datatype, shape)


def encoded_files(plan: Plan) -> list[bytes]:
    """The elements of the binary ``encoded_image`` input: a 4-byte little-endian length, then the file."""
    return rules.bytes_elements(plan.binary, plan.images, "binary data")


# ----------------------------------------------------------------------------- tensors out
def answer(plan: Plan, tensors: list[rules.Tensor]) -> tuple[bytes, int | None]:
    """The response body and, when some output is binary, the JSON header's length
    (``Inference-Header-Content-Length``); the outputs in the order asked."""
    model = plan.model
    header: dict = {"model_name": model.name, "model_version": model.version}
    if plan.request_id:
        header["id"] = plan.request_id
    outputs, parts = [], []
    for t in tensors:
        tensor = {"name": t.output.name, "datatype": t.datatype, "shape": list(t.array.shape)}
        if t.parameters:
            tensor["parameters"] = dict(t.parameters)
        if t.output.raw:
            data = rules.pack_bytes(t.array) if t.datatype == "BYTES" else np.ascontiguousarray(t.array).tobytes()
            tensor.setdefault("parameters", {})[BINARY_DATA_SIZE] = len(data)
            parts.append(data)
        elif t.datatype == "BYTES":
            tensor["data"] = [s.decode() for s in t.array.ravel()]
        else:
            tensor["data"] = t.array.ravel().tolist()  # float32 -> the double of the same value: exact
        outputs.append(tensor)
    header["outputs"] = outputs
    text = json.dumps(header, separators=(",", ":")).encode()
    if not parts:
        return text, None
    return b"".join((text, *parts)), len(text)


# ----------------------------------------------------------------------------- helpers
def _flag(value, what: str) -> bool:
    if not isinstance(value, bool):
        raise invalid(f"{what} is {shown(value)}; send true or false")
    return value


def parameters(obj: dict, what: str) -> dict:
    """An object's ``parameters``, a copy to pop from."""
    params = obj.get("parameters", {})
    if not isinstance(params, dict):
        raise invalid(f"{what}: \"parameters\" must be a JSON object")
    return dict(params)


def known_keys(obj: dict, known: tuple[str, ...], what: str) -> None:
    unknown = [key for key in obj if key not in known]
    if unknown:
        raise invalid(f"{what}: unknown field {quote(unknown[0])}; the fields are {', '.join(known)}")
