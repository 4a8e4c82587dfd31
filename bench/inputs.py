"""What the benchmarks send: the photographs of examples/ as Classify and ModelInfer requests, and the
one image encoder that bench/ and the tests share."""

from __future__ import annotations

import io
import struct
from pathlib import Path

import numpy as np
from PIL import Image

from cifar10_serving.protos.cifar10.v1 import classifier_pb2 as pb
from cifar10_serving.protos.inference import open_inference_grpc_pb2 as v2

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.jpg"))


def example_arrays() -> list[np.ndarray]:
    """The photographs of examples/ as 32 x 32 x 3 uint8 arrays."""
    return [np.asarray(Image.open(p).convert("RGB")) for p in EXAMPLES]


def encode(array: np.ndarray, fmt: str = "PNG", mode: str | None = None, **params) -> bytes:
    """``array`` (H x W x 3 uint8) as a file in ``fmt``, converted to ``mode`` first when given;
    ``params`` go to Pillow's save (``quality=90``, ``progressive=True``)."""
    buffer = io.BytesIO()
    img = Image.fromarray(array)
    if mode:
        img = img.convert(mode)
    img.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def make_image(kind: str, array: np.ndarray) -> pb.Image:
    """One image of ``kind``: png, jpeg (files), or raw (HWC pixels)."""
    if kind == "raw":
        return pb.Image(raw=pb.RawTensor(shape=array.shape, dtype=pb.DTYPE_UINT8, layout=pb.LAYOUT_HWC,
                                         data=array.tobytes()))
    return pb.Image(encoded=encode(array, {"png": "PNG", "jpeg": "JPEG"}[kind]))


def make_requests(kind: str, per_request: int, model: str) -> list[pb.ClassifyRequest]:
    """Classify requests of ``per_request`` images each, the examples in turn, top-1 answers."""
    images = [make_image(kind, a) for a in example_arrays()]
    out = []
    for i in range(len(images)):
        batch = [images[(i + j) % len(images)] for j in range(per_request)]
        out.append(pb.ClassifyRequest(model=model, images=batch, top_k=1))
    return out


def make_v2_requests(kind: str, per_request: int, model: str) -> list[v2.ModelInferRequest]:
    """The same images as ``make_requests`` as ModelInfer requests: raw pixels as a UINT8 ``image``
    tensor (N x 3 x 32 x 32), encoded files as a BYTES ``encoded_image`` tensor; top-1 strings back."""
    arrays = example_arrays()
    files = [make_image(kind, a).encoded for a in arrays] if kind != "raw" else []
    top1 = v2.ModelInferRequest.InferRequestedOutputTensor(name="probabilities")
    top1.parameters["classification"].int64_param = 1
    out = []
    for i in range(len(arrays)):
        picks = [(i + j) % len(arrays) for j in range(per_request)]
        if kind == "raw":
            pixels = np.ascontiguousarray(np.stack([arrays[k] for k in picks]).transpose(0, 3, 1, 2))
            tensor = v2.ModelInferRequest.InferInputTensor(name="image", datatype="UINT8", shape=pixels.shape)
            contents = pixels.tobytes()
        else:
            tensor = v2.ModelInferRequest.InferInputTensor(name="encoded_image", datatype="BYTES", shape=[per_request])
            contents = b"".join(struct.pack("<I", len(files[k])) + files[k] for k in picks)
        out.append(v2.ModelInferRequest(model_name=model, inputs=[tensor], outputs=[top1],
                                        raw_input_contents=[contents]))
    return out
