"""Answers with feature maps as ready-made wire bytes, built off the event loop
(``server.registration`` lets gRPC send them as they are).

grpc.aio serialises a handler's answer on the event loop, then copies the bytes into its own buffer
there too, and the loop runs nothing else meanwhile: not other calls, not health checks. Every
feature map of 64 images is tens of MiB of answer (about 70 MiB for base-max), and each copy of
that held the loop for tens of milliseconds on a busy 2-core machine (bench/RESULTS.md). So the
answer is written in ClassifyResponse's wire format on a thread (the parts every image shares once
per layer, the tensors by numpy copies, which release the GIL, straight into the answer's bytes),
and the service is registered with a serializer that passes such bytes through: gRPC's own copy is
all that is left on the loop. The bytes are those protobuf writes for the same message
(tests/test_wire.py).
"""

from __future__ import annotations

import ctypes
import struct

import numpy as np

# Wire tags (field number << 3 | wire type), from protos/cifar10/v1/classifier.proto
_LEN, _VARINT, _FIXED32 = 2, 0, 5
def with_raw_fields(head: bytes, field: int, parts: list[np.ndarray]) -> bytes:
    """``head`` (a message's serialisation) followed by ``parts`` as repeated bytes field ``field``,
    copied by numpy into one fresh bytes object. When ``field`` is the message's highest-numbered
    field this is exactly what protobuf writes for the message with those parts appended."""
    pieces = [np.frombuffer(head, dtype=np.uint8)]
    for part in parts:
        part = np.ascontiguousarray(part).reshape(-1).view(np.uint8)
        pieces += [np.frombuffer(_tag(field, _LEN) + _varint(len(part)), dtype=np.uint8), part]
    return _joined(pieces)


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


def _prediction(label: bytes, index: int, probability: np.float32) -> bytes:
    """A Prediction as protobuf writes it: proto3 leaves out fields that hold their default."""
    value = struct.pack("<f", probability)
    return ((_field(1, label) if label else b"") + (_tag(2, _VARINT) + _varint(index) if index else b"")
            + (_tag(3, _FIXED32) + value if value != bytes(4) else b""))


def _fresh_bytes(n: int) -> tuple[bytes, np.ndarray]:
    """A new bytes object of ``n`` zeros and a writable array over its contents, to be filled before
    anyone else sees it (as C code fills ``PyBytes_FromStringAndSize(NULL, n)``). gRPC sends only
    bytes, and joining parts into bytes copies them holding the GIL, which stalls the loop as much
    as copying on it; numpy copies into this array without the GIL. ``bytes(n)`` is calloc'd: large
    ones are fresh pages, never touched until filled."""
    out = bytes(n)
    address = np.frombuffer(out, dtype=np.uint8).ctypes.data
    return out, np.frombuffer((ctypes.c_uint8 * n).from_address(address), dtype=np.uint8)


def _joined(pieces: list[np.ndarray]) -> bytes:
    """The uint8 arrays ``pieces`` end to end in one fresh bytes object, copied by numpy."""
    out, view = _fresh_bytes(sum(len(piece) for piece in pieces))
    at = 0
    for piece in pieces:
        view[at: at + len(piece)] = piece
        at += len(piece)
    return out


def encode_response(request_id: str, model: str, version: str, class_names: list[str], probabilities: np.ndarray,
                    order: np.ndarray, maps: dict[str, np.ndarray], dtype_enum: int) -> bytes:
    """A ClassifyResponse in wire format: ``probabilities`` n x classes float32, ``order`` n x top_k
    class indices, ``maps`` layer -> n x shape arrays already in the wire dtype."""
    n = len(probabilities)
    # Per layer, everything before the tensor's bytes is the same for every image.
    prefixes, tensors = [], []
    for name, array in maps.items():
        data_len = array[0].nbytes
        shape = b"".join(_varint(int(d)) for d in array.shape[1:])
        header = (_field(1, name.encode()) + _field(2, shape) + _tag(3, _VARINT) + _varint(dtype_enum)
                  + _tag(4, _LEN) + _varint(data_len))
        prefix = _tag(3, _LEN) + _varint(len(header) + data_len) + header  # Result.feature_maps
        prefixes.append(np.frombuffer(prefix, dtype=np.uint8))
        tensors.append(np.ascontiguousarray(array).reshape(n, -1).view(np.uint8))
    row = sum(len(p) for p in prefixes) + sum(t.shape[1] for t in tensors)
    labels = [name.encode() for name in class_names]
    probs = np.ascontiguousarray(probabilities, dtype="<f4")
    top = b"".join([_field(1, request_id.encode()) if request_id else b"", _field(2, model.encode()),
                    _field(3, version.encode()) if version else b""])
    heads = []  # per image, what comes before its feature maps: ClassifyResponse.results, then Result's own fields
    for i in range(n):
        head = _field(1, probs[i].tobytes())  # packed floats
        for j in order[i]:
            head += _field(2, _prediction(labels[int(j)], int(j), probs[i, j]))
        heads.append(np.frombuffer(_tag(4, _LEN) + _varint(len(head) + row) + head, dtype=np.uint8))
    pieces = [np.frombuffer(top, dtype=np.uint8)]
    for i, head in enumerate(heads):
        pieces.append(head)
        for prefix, tensor in zip(prefixes, tensors):
            pieces += [prefix, tensor[i]]
    return _joined(pieces)
