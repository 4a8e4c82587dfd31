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


# The largest input side served. The decoder fills a batch of 3 x H x W uint8 per request and the
# warm-up runs every batch size up to max_batch_size: at 1024, 64 images are 192 MiB of input and a
# few GiB of activations, as much as one process should hold; CIFAR models take 32, ImageNet ones 224-512.
MAX_INPUT_SIDE = 1024
CHANNELS = 3  # the decoder always produces RGB


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
    """Freezes weights into the graph, which folds batch norm into the convolutions: much more
    throughput at large batches on the CPU (bench/RESULTS.md); same outputs to ~1e-6.

    The frozen module is saved and loaded again: freezing leaves the graph's debug call stacks
    pointing at functions of a temporary copy, so an exception inside a forward pass (an allocation
    failure, say) made TorchScript read freed memory while writing its message: SIGSEGV, every time
    on a worker thread like the batcher's (torch 2.14.1). ``optimize_for_inference`` is left out: it
    crashes the same way, its modules cannot be reloaded, and it added little at best."""
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
    check_servable(metadata, path)
    try:
        with warnings.catch_warnings():
            # PyTorch 2.14 marks torch.jit.load deprecated; TorchScript is still this service's format.
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            module = torch.jit.load(str(path), map_location=device)
    except Exception as exc:  # torch raises RuntimeError or its own types for a bad archive
        raise ModelLoadError(f"{path}: not a loadable TorchScript file: {exc}") from exc
    module.eval()  # before check_module's forward pass, which must not update batch-norm statistics
    check_module(module, metadata, path, device)
    if optimize:
        module = optimize_for_serving(module)
    return LoadedModel(metadata["name"], metadata["version"], path, module, metadata, device)


def check_servable(metadata: dict, path: Path) -> None:
    """The metadata's input is one this server can decode into and warm up (checked before any code
    loads); the format allows more."""
    _, channels, height, width = metadata["input"]["shape"]
    if channels != CHANNELS:
        raise ModelLoadError(f"{path}: input.shape {metadata['input']['shape']} has {channels} channels; this "
                             f"server decodes RGB images, {CHANNELS} channels")
    if height > MAX_INPUT_SIDE or width > MAX_INPUT_SIDE:
        raise ModelLoadError(f"{path}: input.shape {metadata['input']['shape']} asks for {width}x{height} "
                             f"images; this server serves at most {MAX_INPUT_SIDE}x{MAX_INPUT_SIDE}")


def check_module(module: torch.jit.ScriptModule, metadata: dict, path: Path,
                 device: torch.device = torch.device("cpu")) -> None:
    """The module has what the format promises beside ``forward``, its layers are the metadata's, and
    one forward pass on a blank image gives as many scores as there are class names and each layer's
    ``output_shape``: what the server relies on, checked once here rather than failing every call."""
    if not hasattr(module, artifact.FEATURES_METHOD):
        raise ModelLoadError(f"{path}: the module has no {artifact.FEATURES_METHOD} method")
    names = list(getattr(module, artifact.LAYER_NAMES_ATTR, None) or [])
    described = [row["name"] for row in metadata["layers"]]
    if names != described:
        raise ModelLoadError(f"{path}: the module's {artifact.LAYER_NAMES_ATTR} {names} are not the layers "
                             f"{artifact.METADATA_FILE} describes {described}")
    blank = torch.zeros(1, *metadata["input"]["shape"][1:], dtype=torch.uint8, device=device)
    try:
        with torch.no_grad():
            probs, features = getattr(module, artifact.FEATURES_METHOD)(blank, described)
    except Exception as exc:  # TorchScript raises its own error types, with the script's traceback first
        last_line = (str(exc).strip() or type(exc).__name__).splitlines()[-1]
        raise ModelLoadError(f"{path}: a forward pass on one blank image of input.shape fails: {last_line}") from exc
    classes = len(metadata["class_names"])
    if tuple(probs.shape) != (1, classes):
        raise ModelLoadError(f"{path}: the module gives scores of shape {list(probs.shape)[1:]} per image for "
                             f"{classes} class_names")
    for row in metadata["layers"]:
        shape = list(features[row["name"]].shape)[1:]
        if shape != row["output_shape"]:
            raise ModelLoadError(f"{path}: layer {row['name']} gives output of shape {shape}, but "
                                 f"{artifact.METADATA_FILE} says {row['output_shape']}")


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
