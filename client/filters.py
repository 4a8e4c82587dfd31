"""The GetFilters RPC's answers as numpy arrays: ``ClassifierClient.filters`` returns these."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cifar10_serving.protos.cifar10.v1 import classifier_pb2 as pb

_NUMPY_DTYPES = {pb.DTYPE_FLOAT32: np.dtype("<f4"), pb.DTYPE_FLOAT16: np.dtype("<f2")}


@dataclass(frozen=True)
class LayerFilters:
    """One layer's trained weights: ``weight`` (out, in, kH, kW) for a convolution or (out, in) for
    the fully connected layer, ``bias`` (out,) or None, in the dtype asked for."""

    layer: str
    kind: str  # conv, conv_downsample, patch_whitening or fc
    weight: np.ndarray
    bias: np.ndarray | None


def _array(tensor: pb.WeightTensor) -> np.ndarray:
    dtype = _NUMPY_DTYPES.get(tensor.dtype)
    if dtype is None:
        raise ValueError(f"the server sent weights of dtype {tensor.dtype}, which this client does not read")
    return np.frombuffer(tensor.data, dtype=dtype).reshape(tuple(tensor.shape))


def layer_filters(response: pb.Filters) -> dict[str, LayerFilters]:
    """The answer's layers by name, in the model's order."""
    return {f.layer: LayerFilters(f.layer, f.kind, _array(f.weight), _array(f.bias) if f.HasField("bias") else None)
            for f in response.layers}
