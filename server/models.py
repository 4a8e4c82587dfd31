"""Loading model artifacts: self-describing TorchScript files, each with a ``metadata.json`` inside.

Loading is this module's one function, ``load_artifact``, so another format could be added beside
it. TorchScript files carry code: load only files you trust (the server reads its models directory
and nothing else).
"""

from __future__ import annotations

import io
import json
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

METADATA_FILE = "metadata.json"
ARTIFACT_SUFFIX = ".pt"
FEATURES_METHOD = "forward_with_features"  # the exported method that also returns feature maps


class ModelLoadError(RuntimeError):
    pass


@dataclass
class LoadedModel:
    name: str
    version: str
    path: Path
    module: torch.jit.ScriptModule
    metadata: dict[str, Any]
    device: torch.device
    class_names: list[str] = field(init=False)
    layer_names: list[str] = field(init=False)
    input_shape: tuple[int, int, int] = field(init=False)  # (C, H, W)

    def __post_init__(self) -> None:
        self.class_names = list(self.metadata["class_names"])
        self.layer_names = [row["name"] for row in self.metadata["layers"]]
        self.input_shape = tuple(self.metadata["input"]["shape"][1:])

    def layer_shapes(self) -> dict[str, tuple[int, ...]]:
        return {row["name"]: tuple(row["output_shape"]) for row in self.metadata["layers"]}


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {spec!r} asked for, but CUDA is not available")
    return device


def optimize_for_serving(module: torch.jit.ScriptModule) -> torch.jit.ScriptModule:
    """Freezes weights into the graph, which folds batch norm into the convolutions: about twice the
    throughput at batch 64 on a 2-core CPU; same outputs to ~1e-6.

    The frozen module is saved and loaded again: freezing leaves the graph's debug call stacks
    pointing at functions of a temporary copy, so an exception inside a forward pass (an allocation
    failure, say) made TorchScript read freed memory while writing its message: SIGSEGV, every time
    on a worker thread like the batcher's (torch 2.14.1). ``optimize_for_inference`` is left out: it
    crashes the same way, its modules cannot be reloaded, and it added ~12% at batch 64 at best."""
    with warnings.catch_warnings():  # deprecated with the rest of TorchScript in 2.14, still what we serve
        warnings.simplefilter("ignore", FutureWarning)
        frozen = torch.jit.freeze(module, preserved_attrs=[FEATURES_METHOD, "layer_names"])
        buffer = io.BytesIO()
        torch.jit.save(frozen, buffer)
        buffer.seek(0)
        return torch.jit.load(buffer)


def load_artifact(path: str | Path, device: torch.device, optimize: bool = True) -> LoadedModel:
    """Loads one TorchScript file onto ``device`` in eval mode, with its embedded metadata."""
    path = Path(path)
    extra = {METADATA_FILE: ""}
    try:
        with warnings.catch_warnings():
            # PyTorch 2.14 marks torch.jit.load deprecated; TorchScript is still this service's format.
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            module = torch.jit.load(str(path), map_location=device, _extra_files=extra)
    except Exception as exc:  # torch raises RuntimeError or its own types for a bad archive
        raise ModelLoadError(f"{path}: not a loadable TorchScript file: {exc}") from exc
    if not extra[METADATA_FILE]:
        raise ModelLoadError(f"{path}: no {METADATA_FILE} inside; export it with model.export")
    try:
        metadata = json.loads(extra[METADATA_FILE])
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{path}: {METADATA_FILE} is not JSON: {exc}") from exc
    for key in ("name", "class_names", "input", "layers"):
        if key not in metadata:
            raise ModelLoadError(f"{path}: {METADATA_FILE} lacks {key!r}")
    module.eval()
    if optimize:
        module = optimize_for_serving(module)
    return LoadedModel(metadata["name"], str(metadata.get("version", "")), path, module, metadata, device)


def load_models_dir(models_dir: str | Path, device: torch.device, optimize: bool = True) -> dict[str, LoadedModel]:
    """Every ``*.pt`` artifact in ``models_dir`` (not its subfolders), by model name."""
    models_dir = Path(models_dir)
    if not models_dir.is_dir():
        raise ModelLoadError(f"models directory {models_dir} does not exist")
    models: dict[str, LoadedModel] = {}
    for path in sorted(models_dir.glob("*" + ARTIFACT_SUFFIX)):
        model = load_artifact(path, device, optimize)
        if model.name in models:
            raise ModelLoadError(f"{path}: model name {model.name!r} also used by {models[model.name].path}")
        models[model.name] = model
    if not models:
        raise ModelLoadError(f"no *{ARTIFACT_SUFFIX} model artifacts in {models_dir}")
    return models
