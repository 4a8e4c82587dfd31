"""Export a trained CifarNet as one self-describing TorchScript file, and read such files back.

The file is an artifact as ``cifar10_serving.protos.artifact`` specifies: weights, code and a
``metadata.json`` extra file (class names, input spec, pooling, every layer with its kind and output
shape, training recipe, validation accuracy, dataset checksum), so the server needs ``torch.jit.load``
alone. ``export_compiled`` adds the optional compiled package beside it (``torch.export`` and
AOTInductor; ``python -m model.compile``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import warnings
from pathlib import Path
from typing import Any

import torch

from cifar10_serving.model.data import CLASSES, DEFAULT_DATA, load_training_set, validation_split
from cifar10_serving.model.evaluate import evaluate
from cifar10_serving.model.network import POOL_STRIDE, CifarNet, NetConfig, count_flops, describe_layers
from cifar10_serving.protos import artifact

COMPILED_MAX_BATCH = 64  # the server's default --max-batch-size: larger passes run the TorchScript


def build_metadata(net: CifarNet, name: str, version: str, **extra: Any) -> dict:
    """The artifact metadata of ``net`` (format ``artifact.FORMAT_VERSION``); ``extra`` adds the
    provenance keys (``dataset``, ``training``, ``validation``)."""
    cfg = net.config
    return {
        "format_version": artifact.FORMAT_VERSION,
        "name": name,
        "version": version,
        "class_names": list(CLASSES[: cfg.num_classes]),
        "input": {
            "dtype": "uint8",
            "shape": [-1, cfg.in_channels, cfg.in_size, cfg.in_size],
            "layout": "NCHW",
            "color": "RGB",
            "range": [0, 255],
            "normalization": "inside the model",
        },
        "output": {"kind": "softmax", "shape": [-1, cfg.num_classes]},
        "pooling": {"kind": cfg.pool, "window": cfg.pool_size, "stride": POOL_STRIDE, "padding": 0},
        "architecture": cfg.to_dict(),
        "layers": describe_layers(net),
        "flops_per_image": count_flops(net),
        "parameters": sum(p.numel() for p in net.parameters()),
        "torch_version": torch.__version__,
        **extra,
    }


def export_torchscript(net: CifarNet, path: str | Path, metadata: dict) -> Path:
    """Scripts ``net`` (eval mode, on the CPU) and saves it with ``metadata`` embedded (checked first:
    metadata the server would refuse raises ``artifact.ArtifactFormatError`` and nothing is written)."""
    text = artifact.encode_metadata(metadata)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    net = net.to("cpu", memory_format=torch.contiguous_format).eval()
    with warnings.catch_warnings():
        # PyTorch 2.14 marks TorchScript deprecated; it is still what the service is built on.
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        scripted = torch.jit.script(net)
        scripted.save(str(path), _extra_files={artifact.METADATA_FILE: text})
    return path


class _AllFeatures(torch.nn.Module):
    """``forward_with_features`` over every layer, as a flat tuple: what ``torch.export`` can trace."""

    def __init__(self, net: CifarNet) -> None:
        super().__init__()
        self.net = net
        self.names = list(net.layer_names)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        probs, features = self.net.forward_with_features(x, self.names)
        return (probs, *[features[name] for name in self.names])


def export_compiled(net: CifarNet, path: str | Path, metadata: dict, source: str | Path,
                    max_batch: int = COMPILED_MAX_BATCH) -> Path:
    """Compiles ``net`` ahead of time with ``torch.export`` and AOTInductor, for the CPU, into the
    package ``protos/artifact.py`` specifies: models ``forward`` and ``features`` for batches of 1 to
    ``max_batch``, with ``metadata`` (the metadata of ``source``, the ``.pt`` it accelerates) and a
    ``compiled`` section naming that file's sha256. Needs a C++ compiler (times: model/README.md).
    Kernels read their thread count when they run (``cpp.dynamic_threads``), so one package serves
    passes of any thread share."""
    from torch._inductor import aot_compile, cpu_vec_isa
    from torch.export.pt2_archive._package import package_pt2

    path = Path(path)
    if path.suffix != artifact.COMPILED_SUFFIX:
        raise ValueError(f"{path}: a compiled package is named *{artifact.COMPILED_SUFFIX}")
    isa = cpu_vec_isa.pick_vec_isa()
    metadata = {**metadata, "compiled": {
        "source_sha256": hashlib.sha256(Path(source).read_bytes()).hexdigest(), "device": "cpu",
        "cpu_isa": str(isa) if isa else "", "max_batch": max_batch, "torch_version": torch.__version__}}
    text = artifact.encode_metadata(metadata)
    net = net.to("cpu", memory_format=torch.contiguous_format).eval()
    example = torch.zeros(min(4, max_batch), *metadata["input"]["shape"][1:], dtype=torch.uint8)
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    files = {}
    options = {"aot_inductor.package": True, "cpp.dynamic_threads": True}
    for name, module in ((artifact.COMPILED_FORWARD, net), (artifact.COMPILED_FEATURES, _AllFeatures(net))):
        with torch.no_grad():
            program = torch.export.export(module, (example,), dynamic_shapes=({0: batch},))
            files[name] = aot_compile(program.module(), (example,), options=options)
    path.parent.mkdir(parents=True, exist_ok=True)
    package_pt2(str(path), aoti_files=files, extra_files={artifact.METADATA_FILE: text})
    return path


def load_scripted(path: str | Path) -> tuple[torch.jit.ScriptModule, dict]:
    """An exported file on the CPU: the scripted module and its metadata, checked before the module
    is loaded (``artifact.ArtifactFormatError`` for a file of another format)."""
    metadata = artifact.read_metadata(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        module = torch.jit.load(str(path), map_location="cpu")
    return module, metadata


def load_eager(path: str | Path) -> tuple[CifarNet, dict]:
    """An exported file rebuilt as an eager ``CifarNet`` (its architecture from the metadata, its
    weights from the archive), on the CPU, with the metadata."""
    scripted, metadata = load_scripted(path)
    if not isinstance(metadata.get("architecture"), dict):  # optional in the format, needed here
        raise artifact.ArtifactFormatError(f"{path}: {artifact.METADATA_FILE} has no 'architecture' to rebuild "
                                           f"the network from")
    arch = {**metadata["architecture"], "widths": tuple(metadata["architecture"]["widths"])}
    net = CifarNet(NetConfig(**arch))
    net.load_state_dict(scripted.state_dict())
    return net, metadata


def reexport(src: str | Path, dst: str | Path, name: str, data_source: str | Path, cache_dir: str | Path | None,
             note: str = "") -> dict:
    """Re-exports a trained file under ``name`` with this code: rebuilds the eager network from its
    metadata, loads its weights, re-scores the validation split on the CPU in float32 and writes the
    file with fresh metadata (the training record is kept). For shipping a sweep run as a named model."""
    net, old = load_eager(src)
    data = load_training_set(data_source, cache_dir=cache_dir)
    if data.sha256 != old["dataset"]["sha256"]:
        raise ValueError(f"{src} was trained on data with sha256 {old['dataset']['sha256']}, not {data.sha256}")
    val = old["validation"]
    _, val_idx = validation_split(data.labels, val["images"] // len(CLASSES), val["split_seed"])
    scores = evaluate(net, data.images[val_idx], data.labels[val_idx], torch.device("cpu"), exact=True)
    training = {**old["training"], "run_name": old["name"], "torch_version": old["torch_version"]}
    if note:
        training["note"] = note
    metadata = build_metadata(net, name, old["version"], dataset=old["dataset"], training=training,
                              validation={**val, **scores, "scored_on": "CPU, float32, at export"})
    export_torchscript(net, dst, metadata)
    return {"old": {k: val.get(k) for k in ("accuracy", "accuracy_flip_tta")}, "new": scores}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m model.export",
                                description="Re-export a trained file under another name, re-scored on the CPU.")
    p.add_argument("src")
    p.add_argument("--name", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--data", default=str(DEFAULT_DATA))
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--note", default="")
    args = p.parse_args(argv)
    print(json.dumps(reexport(args.src, args.out, args.name, args.data, args.cache_dir, args.note)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
