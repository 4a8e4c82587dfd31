"""Loading model artifacts: self-describing TorchScript files in the format
``cifar10_serving.protos.artifact`` specifies, each with a ``metadata.json`` inside.

Loading is this module's one function, ``load_artifact``, so another format could be added beside
it. TorchScript files carry code: load only files you trust (the server reads its models directory
and nothing else).
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cifar10_serving.protos import artifact


class ModelLoadError(RuntimeError):
    """A model that cannot be served; the message names the file (or setting) and what is wrong."""


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
        frozen = torch.jit.freeze(module, preserved_attrs=list(artifact.EXPORTED_NAMES))
        buffer = io.BytesIO()
        torch.jit.save(frozen, buffer)
        buffer.seek(0)
        return torch.jit.load(buffer)


def load_artifact(path: str | Path, device: torch.device, optimize: bool = True) -> LoadedModel:
    """Loads one artifact onto ``device`` in eval mode, with its embedded metadata. The metadata is
    checked first, so a file of a format this server does not read is refused before its code loads;
    every refusal is a ``ModelLoadError`` that names the file and the problem."""
    path = Path(path)
    try:
        metadata = artifact.read_metadata(path)
    except artifact.ArtifactFormatError as exc:
        raise ModelLoadError(str(exc)) from exc
    try:
        with warnings.catch_warnings():
            # PyTorch 2.14 marks torch.jit.load deprecated; TorchScript is still this service's format.
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            module = torch.jit.load(str(path), map_location=device)
    except Exception as exc:  # torch raises RuntimeError or its own types for a bad archive
        raise ModelLoadError(f"{path}: not a loadable TorchScript file: {exc}") from exc
    check_module(module, metadata, path)
    module.eval()
    if optimize:
        module = optimize_for_serving(module)
    return LoadedModel(metadata["name"], metadata["version"], path, module, metadata, device)


def check_module(module: torch.jit.ScriptModule, metadata: dict, path: Path) -> None:
    """The module has what the format promises beside ``forward``, and its layers are the metadata's."""
    if not hasattr(module, artifact.FEATURES_METHOD):
        raise ModelLoadError(f"{path}: the module has no {artifact.FEATURES_METHOD} method")
    names = list(getattr(module, artifact.LAYER_NAMES_ATTR, None) or [])
    described = [row["name"] for row in metadata["layers"]]
    if names != described:
        raise ModelLoadError(f"{path}: the module's {artifact.LAYER_NAMES_ATTR} {names} are not the layers "
                             f"{artifact.METADATA_FILE} describes {described}")


def load_models_dir(models_dir: str | Path, device: torch.device, optimize: bool = True) -> dict[str, LoadedModel]:
    """Every ``*.pt`` artifact in ``models_dir`` (not its subfolders), by model name."""
    models_dir = Path(models_dir)
    if not models_dir.is_dir():
        raise ModelLoadError(f"models directory {models_dir} does not exist")
    models: dict[str, LoadedModel] = {}
    for path in sorted(models_dir.glob("*" + artifact.ARTIFACT_SUFFIX)):
        model = load_artifact(path, device, optimize)
        if model.name in models:
            raise ModelLoadError(f"{path}: model name {model.name!r} also used by {models[model.name].path}")
        models[model.name] = model
    if not models:
        raise ModelLoadError(f"no *{artifact.ARTIFACT_SUFFIX} model artifacts in {models_dir}")
    return models
