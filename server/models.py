"""Loading model artifacts: self-describing TorchScript files in the format
``cifar10_serving.protos.artifact`` specifies, each with a ``metadata.json`` inside.

Loading is this module's one function, ``load_artifact``, so another format could be added beside
it. TorchScript files carry code: load only files you trust (the server reads its models directory
and nothing else).
"""

from __future__ import annotations

import ctypes
import hashlib
import io
import logging
import tempfile
import warnings
import weakref
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch._C._aoti as _aoti

from cifar10_serving.protos import artifact


# The largest input side served. The decoder fills a batch of 3 x H x W uint8 per request and the
# warm-up runs every batch size up to max_batch_size: at 1024, 64 images are 192 MiB of input and a
# few GiB of activations, as much as one process should hold; CIFAR models take 32, ImageNet ones 224-512.
MAX_INPUT_SIDE = 1024
CHANNELS = 3  # the decoder always produces RGB
log = logging.getLogger(__name__)


class ModelLoadError(RuntimeError):
    """A model that cannot be served; the message names the file (or setting) and what is wrong."""


class _CompiledRunner:
    """One AOTInductor model of a package, run through its shared object's C interface with ctypes,
    which lets go of the GIL for the pass: torch's own runner (``torch._inductor.aoti_load_package``)
    holds it for the whole pass, and the event loop stops as long (docs/compiled.md). The interface's calls take the
    input handles and give the output handles (``torch/csrc/inductor/aoti_runtime/interface.h``)."""

    def __init__(self, library: Path, models: int) -> None:
        self._lib = ctypes.CDLL(str(library))
        self._handle = ctypes.c_void_p()
        self._check(self._lib.AOTInductorModelContainerCreateWithDevice(
            ctypes.byref(self._handle), ctypes.c_size_t(models), b"cpu", None), "create")
        outputs = ctypes.c_size_t()
        self._check(self._lib.AOTInductorModelContainerGetNumOutputs(self._handle, ctypes.byref(outputs)), "inspect")
        self.outputs = outputs.value
        weakref.finalize(self, self._lib.AOTInductorModelContainerDelete, self._handle)

    @staticmethod
    def _check(code: int, what: str) -> None:
        if code != 0:  # AOTI_RUNTIME_FAILURE; the runtime has written its reason to stderr
            raise RuntimeError(f"the compiled model's {what} call failed (code {code}; the reason is in the log)")

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        handles = [_capsule_pointer(c) for c in _aoti.unsafe_alloc_void_ptrs_from_tensors([x.contiguous()])]
        inputs = (ctypes.c_void_p * 1)(*handles)  # stolen by the call, as its interface says
        outputs = (ctypes.c_void_p * self.outputs)()
        self._check(self._lib.AOTInductorModelContainerRun(self._handle, inputs, ctypes.c_size_t(1), outputs,
                                                           ctypes.c_size_t(self.outputs), None, None), "run")
        return _aoti.alloc_tensors_by_stealing_from_void_ptrs([_capsule(p) for p in outputs])


_pythonapi = ctypes.pythonapi
_pythonapi.PyCapsule_GetPointer.restype = ctypes.c_void_p
_pythonapi.PyCapsule_GetPointer.argtypes = [ctypes.py_object, ctypes.c_char_p]
_pythonapi.PyCapsule_New.restype = ctypes.py_object
_pythonapi.PyCapsule_New.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]


def _capsule_pointer(capsule) -> int:
    return _pythonapi.PyCapsule_GetPointer(capsule, None)


def _capsule(pointer: int):
    return _pythonapi.PyCapsule_New(pointer, None, None)


class CompiledModel:
    """A ``.pt2`` package's two AOTInductor models (``protos/artifact.py``): ``forward`` and
    ``features`` (every layer, in ``layer_names`` order), for batches of 1 to ``max_batch``. Each
    model runs up to ``runners`` passes at once (one per thread that calls it)."""

    def __init__(self, path: Path, metadata: dict, layer_names: list[str], runners: int) -> None:
        self.path = path
        self.max_batch = metadata["compiled"]["max_batch"]
        self.layer_names = layer_names
        wanted = (artifact.COMPILED_FORWARD, artifact.COMPILED_FEATURES)
        with zipfile.ZipFile(path) as archive, tempfile.TemporaryDirectory(prefix="compiled-") as folder:
            libraries = {}
            for name in wanted:  # <root>/data/aotinductor/<name>/<hash>.wrapper.so
                found = [n for n in archive.namelist() if n.split("/")[1:4] == ["data", "aotinductor", name]
                         and n.endswith(".so")]
                if len(found) != 1:
                    raise ModelLoadError(f"{path}: {len(found)} shared objects for the compiled model {name!r}, "
                                         f"expected one")
                libraries[name] = archive.extract(found[0], folder)
            # Loaded, the objects need no file: the folder goes once both are open.
            self._forward, self._features = (_CompiledRunner(Path(libraries[name]), runners) for name in wanted)
        if self._forward.outputs != 1 or self._features.outputs != 1 + len(layer_names):
            raise ModelLoadError(f"{path}: its models give {self._forward.outputs} and {self._features.outputs} "
                                 f"outputs; expected 1 and {1 + len(layer_names)} (the scores and every layer)")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self._forward(x)[0]

    def forward_with_features(self, x: torch.Tensor, layers) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """As the TorchScript method: scores and the named layers' outputs (the package computes them all)."""
        probs, *outputs = self._features(x)
        wanted = set(layers)
        return probs, {name: t for name, t in zip(self.layer_names, outputs) if name in wanted}


@dataclass
class LoadedModel:
    name: str
    version: str
    path: Path
    module: torch.jit.ScriptModule
    metadata: dict[str, Any]
    device: torch.device
    compiled: CompiledModel | None = None  # the .pt2 beside the file, where one was found and taken
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


def load_artifact(path: str | Path, device: torch.device, optimize: bool = True, compiled_runners: int = 0,
                  check_metadata: Callable[[dict], None] | None = None) -> LoadedModel:
    """Loads one artifact onto ``device`` in eval mode, with its embedded metadata. The metadata is
    checked first, so a file of a format this server does not read is refused before its code loads;
    every refusal is a ``ModelLoadError`` that names the file and the problem. ``check_metadata``:
    the caller's own check of the metadata (the repository's: the name and version it expects), run
    there too, before any code. ``compiled_runners`` > 0 on the CPU: the compiled package beside the
    file, if there is one, is checked and loaded too (``load_compiled``), for that many passes at once."""
    path = Path(path)
    try:
        metadata = artifact.read_metadata(path)
    except artifact.ArtifactFormatError as exc:
        raise ModelLoadError(str(exc)) from exc
    check_servable(metadata, path)
    if check_metadata is not None:
        check_metadata(metadata)
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
    model = LoadedModel(metadata["name"], metadata["version"], path, module, metadata, device)
    package = path.with_suffix(artifact.COMPILED_SUFFIX)
    if compiled_runners > 0 and package.is_file():
        if device.type == "cpu":
            model.compiled = load_compiled(package, model, compiled_runners)
        else:
            log.info("%s: compiled for the CPU; the model runs on %s with its TorchScript", package, device)
    return model


def load_compiled(package: Path, model: LoadedModel, runners: int) -> CompiledModel:
    """The compiled package of ``model``, checked as an artifact is before any of its code loads: its
    metadata is readable, equal to the ``.pt``'s but for ``compiled``, compiled from these very bytes
    (sha256), by this torch, for instructions this CPU has; then both its models must give the
    TorchScript's answers on a test batch. Any failure is a ``ModelLoadError`` naming the package."""
    try:
        metadata = artifact.read_metadata(package)
    except artifact.ArtifactFormatError as exc:
        raise ModelLoadError(str(exc)) from exc
    compiled = metadata.get("compiled")
    if not compiled:
        raise ModelLoadError(f"{package}: {artifact.METADATA_FILE} has no 'compiled' section; write the package "
                             f"with python -m model.compile")
    differs = sorted(k for k in {*metadata, *model.metadata} - {"compiled"} if metadata.get(k) != model.metadata.get(k))
    if differs:
        raise ModelLoadError(f"{package}: its metadata differs from {model.path.name}'s in {', '.join(differs)}; "
                             f"compile it again from that file")
    digest = hashlib.sha256(model.path.read_bytes()).hexdigest()
    if compiled["source_sha256"] != digest:
        raise ModelLoadError(f"{package}: compiled from a file with sha256 {compiled['source_sha256'][:12]}..., "
                             f"not from {model.path.name} ({digest[:12]}...); compile it again")
    if compiled["torch_version"] != torch.__version__ or compiled["device"] != "cpu":
        raise ModelLoadError(f"{package}: compiled for {compiled['device']} by torch {compiled['torch_version']}; "
                             f"this server runs torch {torch.__version__} on the CPU; compile it again here")
    flags = cpu_flags()
    missing = sorted(flag for flag in ISA_FLAGS.get(compiled["cpu_isa"], ()) if flags and flag not in flags)
    if missing:
        raise ModelLoadError(f"{package}: compiled for {compiled['cpu_isa']}, and this CPU lacks "
                             f"{', '.join(missing)}; compile it again on this machine")
    try:
        loaded = CompiledModel(package, metadata, model.layer_names, runners)
    except ModelLoadError:
        raise
    except Exception as exc:  # torch's loader raises RuntimeError for a bad archive or shared object
        raise ModelLoadError(f"{package}: not a loadable compiled package: {exc}") from exc
    check_compiled(loaded, model)
    return loaded


def check_compiled(compiled: CompiledModel, model: LoadedModel) -> None:
    """Both compiled models give the TorchScript's scores and layer outputs on a batch of noise."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (2, *model.input_shape), dtype=torch.uint8, generator=generator)
    try:
        with torch.inference_mode():
            expected, features = model.module.forward_with_features(x, model.layer_names)
            probs = compiled(x)
            probs_too, outputs = compiled.forward_with_features(x, model.layer_names)
    except Exception as exc:
        last_line = (str(exc).strip() or type(exc).__name__).splitlines()[-1]
        raise ModelLoadError(f"{compiled.path}: a pass of the compiled package fails: {last_line}") from exc
    for name, got, want in (("forward", probs, expected), ("features", probs_too, expected),
                            *((f"layer {n}", outputs.get(n), features[n]) for n in model.layer_names)):
        if got is None or got.shape != want.shape or not torch.allclose(got, want, rtol=1e-3, atol=1e-4):
            raise ModelLoadError(f"{compiled.path}: its {name} does not give what {model.path.name} gives; "
                                 f"compile it again from that file")


# The /proc/cpuinfo flags each of inductor's x86 vector instruction sets needs (torch._inductor.cpu_vec_isa);
# other sets (and none) are not checked.
ISA_FLAGS = {"avx2": ("avx2", "fma"), "avx512": ("avx512f", "avx512bw", "avx512vl", "avx512dq"),
             "amx_tile": ("amx_tile", "avx512f")}


def cpu_flags() -> set[str]:
    """This CPU's feature flags (Linux); empty elsewhere, where nothing is checked."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((line for line in text.splitlines() if line.startswith("flags")), "")
    return set(line.partition(":")[2].split())


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
