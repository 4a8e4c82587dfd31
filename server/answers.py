"""Answers with feature maps, encoded off the event loop so that gRPC's serialising them is one copy.

grpc.aio serialises a handler's answer on the event loop, and protobuf (upb) takes time per
message: every feature map of 64 images is about 1,600 messages, whose serialisation held the loop,
and with it every call and health check, for hundreds of milliseconds on the larger networks. Here
the answer is written in the wire format directly (the parts every image shares once per layer,
the tensors by numpy copies), then parsed into an ``Empty`` message, which keeps all of it as
unknown fields; ``ClassifyResponse.SerializeToString``, the serialiser gRPC calls, writes unknown
fields as they are: one copy. ``available()`` checks that the protobuf runtime does this; when it
does not, the service builds ordinary messages instead.
"""

from __future__ import annotations

import struct

import numpy as np
from google.protobuf import empty_pb2

from cifar10_serving.protos.cifar10.v1 import classifier_pb2 as pb

# Wire tags (field number << 3 | wire type), from protos/cifar10/v1/classifier.proto
_LEN, _VARINT, _FIXED32 = 2, 0, 5


def _tag(field: int, wire: int) -> bytes:
    return _varint(field << 3 | wire)


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _field(field: int, payload: bytes) -> bytes:
    return _tag(field, _LEN) + _varint(len(payload)) + payload


def available() -> bool:
    """Whether the serialiser gRPC calls writes an ``Empty``'s unknown fields verbatim (upb does)."""
    probe = pb.ClassifyResponse(model="probe", results=[pb.Result(probabilities=[0.5])]).SerializeToString()
    try:
        return pb.ClassifyResponse.SerializeToString(empty_pb2.Empty.FromString(probe)) == probe
    except Exception:  # another protobuf runtime may refuse a message of another type
        return False


def encode_response(request_id: str, model: str, version: str, class_names: list[str], probabilities: np.ndarray,
                    order: np.ndarray, maps: dict[str, np.ndarray], dtype_enum: int) -> empty_pb2.Empty:
    """A ClassifyResponse as an ``Empty`` of unknown fields: ``probabilities`` n x classes float32,
    ``order`` n x top_k class indices, ``maps`` layer -> n x shape arrays already in the wire dtype."""
    n = len(probabilities)
    # Per layer, everything before the tensor's bytes is the same for every image.
    prefixes, sizes = [], []
    for name, array in maps.items():
        data_len = array[0].nbytes
        shape = b"".join(_varint(int(d)) for d in array.shape[1:])
        header = (_field(1, name.encode()) + _field(2, shape) + _tag(3, _VARINT) + _varint(dtype_enum)
                  + _tag(4, _LEN) + _varint(data_len))
        prefixes.append(_tag(3, _LEN) + _varint(len(header) + data_len) + header)  # Result.feature_maps
        sizes.append(data_len)
    row = sum(len(p) for p in prefixes) + sum(sizes)
    features = np.empty((n, row), dtype=np.uint8)  # numpy copies the tensors without the interpreter
    at = 0
    for prefix, size, array in zip(prefixes, sizes, maps.values()):
        features[:, at:at + len(prefix)] = np.frombuffer(prefix, dtype=np.uint8)
        at += len(prefix)
        features[:, at:at + size] = np.ascontiguousarray(array).reshape(n, -1).view(np.uint8)
        at += size
    labels = [name.encode() for name in class_names]
    probs = np.ascontiguousarray(probabilities, dtype="<f4")
    parts = [_field(1, request_id.encode()) if request_id else b"", _field(2, model.encode()),
             _field(3, version.encode()) if version else b""]
    for i in range(n):
        head = _field(1, probs[i].tobytes())  # packed floats
        for j in order[i]:
            j = int(j)
            head += _field(2, _field(1, labels[j]) + _tag(2, _VARINT) + _varint(j)
                           + _tag(3, _FIXED32) + struct.pack("<f", float(probs[i, j])))
        parts += [_tag(4, _LEN), _varint(len(head) + row), head, features[i].data]  # ClassifyResponse.results
    return empty_pb2.Empty.FromString(b"".join(parts))
