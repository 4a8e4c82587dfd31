"""The wire-format answers of server.wire are the bytes protobuf writes for the same messages."""

from __future__ import annotations

import numpy as np
import pytest

from cifar10_serving.protos.cifar10.v1 import classifier_pb2 as pb
from cifar10_serving.server import registration, wire

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@pytest.mark.parametrize("dtype, dtype_enum", [("<f4", pb.DTYPE_FLOAT32), ("<f2", pb.DTYPE_FLOAT16)])
@pytest.mark.parametrize("request_id", ["", "r-1"])
def test_encoded_answers_are_the_bytes_protobuf_writes(dtype, dtype_enum, request_id):
    rng = np.random.default_rng(1)
    n = 5
    probs = rng.random((n, 10), dtype=np.float32)
    probs /= probs.sum(axis=1, keepdims=True)
    probs[0, 3] = 0.0  # a zero, which protobuf leaves out of a Prediction
    order = np.argsort(-probs, axis=1, kind="stable")[:, :3]
    order[0] = [0, 3, 1]  # index 0 and probability 0.0: fields protobuf leaves out
    maps = {"stage1.conv1": rng.standard_normal((n, 4, 32, 32)).astype(dtype),
            "head.flatten": rng.standard_normal((n, 300)).astype(dtype)}
    encoded = wire.encode_response(request_id, "tiny-max", "v1", CLASSES, probs, order, maps, dtype_enum)
    expected = pb.ClassifyResponse(request_id=request_id, model="tiny-max", model_version="v1", results=[
        pb.Result(probabilities=probs[i].tolist(),
                  top_k=[pb.Prediction(label=CLASSES[j], index=int(j), probability=float(probs[i, j])) for j in order[i]],
                  feature_maps=[pb.FeatureMap(layer=name, shape=a.shape[1:], dtype=dtype_enum, data=a[i].tobytes())
                                for name, a in maps.items()])
        for i in range(n)])
    assert type(encoded) is bytes and registration.serialize(encoded) is encoded  # what gRPC sends
    assert encoded == expected.SerializeToString()
    assert registration.serialize(expected) == encoded


def test_raw_fields_appended_by_hand_are_the_bytes_protobuf_writes():
    from cifar10_serving.protos.inference import open_inference_grpc_pb2 as v2
    from cifar10_serving.server.open_inference import RAW_OUTPUT_FIELD

    rng = np.random.default_rng(3)
    parts = [rng.standard_normal((2, 4, 3, 3)).astype("<f4"), np.frombuffer(b"\x03\x00\x00\x00cat", np.uint8),
             rng.standard_normal((2, 200)).astype("<f2"), np.zeros(0, np.uint8)]
    head = v2.ModelInferResponse(model_name="m", model_version="2", id="x")
    for name in ("a", "b", "c", "d"):
        head.outputs.add(name=name, datatype="FP32", shape=[2])
    whole = v2.ModelInferResponse()
    whole.CopyFrom(head)
    whole.raw_output_contents.extend(p.tobytes() for p in parts)
    encoded = wire.with_raw_fields(head.SerializeToString(), RAW_OUTPUT_FIELD, parts)
    assert type(encoded) is bytes and encoded == whole.SerializeToString()
    assert list(v2.ModelInferResponse.FromString(encoded).raw_output_contents) == [p.tobytes() for p in parts]
