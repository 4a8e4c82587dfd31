"""A TorchServe handler for our model file, for the side-by-side in ``bench.peer`` (packed into the
.mar by torch-model-archiver; it runs in TorchServe's worker, where ``cifar10_serving`` is not installed).

What it does, so the comparison is fair:
- loads the same ``.pt`` with ``torch.jit.load`` and freezes it as our server does
  (``server.models.optimize_for_serving``: ``torch.jit.freeze`` keeping ``forward_with_features`` and
  ``layer_names``, which folds batch norm into the convolutions; then a save and load round trip);
- decodes each request's PNG or JPEG bytes with torchvision's decoder to RGB uint8 (ours uses the
  same one) and refuses any size but the model's input (ours would resize; the bench sends 32x32);
- stacks the requests TorchServe batched into one uint8 N x 3 x 32 x 32 tensor and runs one forward
  pass under ``inference_mode`` with ``torch_threads`` intra-op threads (1 unless the .mar's
  model-config.yaml says otherwise), as ours runs its batcher's forward;
- answers each request with JSON holding the 10 softmax scores and the top-1 label and probability,
  what ours answers to ``top_k=1`` (every class's probability, and the best one's label).
It is a bare class, not TorchServe's ``BaseHandler``, so none of BaseHandler's per-request timing
and profiling hooks run: the lightest handler TorchServe can have.
"""

from __future__ import annotations

import io
import json
import os
import warnings

import torch
from torchvision.io import ImageReadMode, decode_image

INPUT_KEYS = ("data", "body")  # gRPC's input map key the bench sends; "body" is TorchServe's HTTP default
EXPORTED_NAMES = ["forward_with_features", "layer_names"]  # cifar10_serving.protos.artifact.EXPORTED_NAMES


class Cifar10Handler:
    def __init__(self) -> None:
        self.module = None
        self.class_names: list[str] = []
        self.size: tuple[int, int] = (0, 0)

    def initialize(self, context) -> None:
        config = (context.model_yaml_config or {}).get("handler", {})
        torch.set_num_threads(int(config.get("torch_threads", 1)))
        model_dir = context.system_properties["model_dir"]
        path = os.path.join(model_dir, context.manifest["model"]["serializedFile"])
        extra = {"metadata.json": ""}
        with warnings.catch_warnings():  # torch 2.14 marks TorchScript deprecated, as our server notes
            warnings.simplefilter("ignore", FutureWarning)
            module = torch.jit.load(path, map_location="cpu", _extra_files=extra).eval()
            frozen = torch.jit.freeze(module, preserved_attrs=EXPORTED_NAMES)
            buffer = io.BytesIO()
            torch.jit.save(frozen, buffer)  # the round trip our server makes (see its optimize_for_serving)
            buffer.seek(0)
            self.module = torch.jit.load(buffer)
        metadata = json.loads(extra["metadata.json"])
        self.class_names = list(metadata["class_names"])
        self.size = tuple(metadata["input"]["shape"][2:])

    def decode(self, row: dict) -> torch.Tensor:
        data = next((row[k] for k in INPUT_KEYS if k in row), None)
        if data is None:
            raise ValueError(f"no image: send its PNG or JPEG bytes under input key {INPUT_KEYS[0]!r}")
        image = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        if tuple(image.shape[1:]) != self.size:
            raise ValueError(f"image is {image.shape[2]}x{image.shape[1]}, expected {self.size[1]}x{self.size[0]}")
        return image

    def handle(self, data: list[dict], context) -> list[str]:
        batch = torch.stack([self.decode(row) for row in data])
        with torch.inference_mode():
            probabilities = self.module(batch)
        top = probabilities.argmax(dim=1).tolist()
        return [json.dumps({"label": self.class_names[i], "probability": scores[i], "probabilities": scores})
                for i, scores in zip(top, probabilities.tolist())]
