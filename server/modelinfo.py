"""ModelInfo messages, built from an artifact's embedded metadata."""

from __future__ import annotations

import json

from cifar10_serving.protos.cifar10.v1 import classifier_pb2 as pb
from cifar10_serving.server.models import LoadedModel


def model_info(model: LoadedModel, is_default: bool) -> pb.ModelInfo:
    meta = model.metadata
    pooling = meta.get("pooling", {})
    validation = meta.get("validation") or {}
    dataset = meta.get("dataset") or {}
    source = dataset.get("source", "")
    return pb.ModelInfo(
        name=model.name,
        version=model.version,
        is_default=is_default,
        class_names=model.class_names,
        input=pb.InputSpec(shape=model.input_shape, dtype=meta["input"].get("dtype", "uint8"),
                           color=meta["input"].get("color", "RGB")),
        pooling=pb.Pooling(kind=pooling.get("kind", ""), window=pooling.get("window", 0),
                           stride=pooling.get("stride", 0), padding=pooling.get("padding", 0)),
        layers=[pb.Layer(name=row["name"], kind=row["kind"], output_shape=row["output_shape"],
                         flops=row.get("flops", 0), kernel=row.get("kernel", 0), stride=row.get("stride", 0))
                for row in meta["layers"]],
        flops_per_image=meta.get("flops_per_image", 0),
        parameters=meta.get("parameters", 0),
        validation_accuracy=validation.get("accuracy") or 0.0,
        validation_images=validation.get("images") or 0,
        dataset="CIFAR-10 (JPEG)" if source.startswith("jpeg-archive") else ("CIFAR-10" if source else ""),
        device=str(model.device),
        metadata_json=json.dumps(meta),
    )
