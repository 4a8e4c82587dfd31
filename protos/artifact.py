"""The model artifact format: the contract between ``model/`` (which writes it) and ``server/`` (which serves it).

An artifact is one TorchScript file, ``<name>.pt``, as ``torch.jit.save`` writes it: a zip archive
whose members all sit under one root folder (the file's stem, or ``archive`` when saved to a buffer)::

    <root>/data.pkl, <root>/code/..., <root>/data/...  the scripted module: weights and code
    <root>/extra/metadata.json                          this format's metadata (``_extra_files``)

The scripted module
    ``forward(x) -> probs``: ``x`` uint8 N x C x H x W, RGB, 0..255 (normalisation happens inside);
    ``probs`` float N x len(class_names), softmax scores.
    ``forward_with_features(x, layers: List[str]) -> (probs, Dict[str, Tensor])``: the same scores
    and, from the same pass, the outputs of the named layers (N x *output_shape each); an unknown
    name raises.
    ``layer_names: List[str]``: the names ``forward_with_features`` accepts, in order, equal to the
    metadata's ``layers[*].name``.
    The server freezes the module keeping ``EXPORTED_NAMES``, so both must survive ``torch.jit.freeze``.

The metadata, ``metadata.json`` (a UTF-8 JSON object; the server also hands it to clients whole, as
``ModelInfo.metadata_json``): required keys
    ``format_version`` int: the version of this format the file was written in.
    ``name`` str: the model's name, unique in a models directory; what requests ask for.
    ``version`` str: the model's own version (retraining bumps it; unrelated to ``format_version``).
    ``class_names`` list[str]: label of each output index, in order.
    ``input`` object: ``shape`` [-1, C, H, W] (positive C, H, W) and ``dtype`` "uint8"; also
    ``color`` ("RGB"), ``layout`` ("NCHW"), ``range`` and ``normalization``, descriptive.
    ``layers`` list of objects, one per entry of ``layer_names``, in order: ``name`` str,
    ``kind`` str (conv, maxpool, avgpool, batchnorm, gelu, residual_add, fc, ...),
    ``output_shape`` list[int] per image; optionally ``flops``, ``kernel``, ``stride``, ``padding`` ints.
    The last layer of kind ``fc`` gives the scores: its ``output_shape`` is [len(class_names)].

Optional keys (the exporter writes them all; readers must cope with their absence)
    ``pooling`` object: ``kind`` str, ``window`` positive int, ``stride`` positive int, ``padding`` int >= 0.
    ``output`` object: ``kind`` ("softmax") and ``shape`` [-1, len(class_names)].
    ``architecture`` object: the network's configuration, enough to rebuild it eagerly (``model.export``).
    ``flops_per_image``, ``parameters`` int.
    ``torch_version`` str: the torch that wrote the file.
    ``dataset``, ``training`` objects; ``validation`` object or null: provenance and the held-out
    accuracy (``accuracy``, ``accuracy_flip_tta`` numbers or null, ``images``, ``split_seed`` ints or null).
    Other keys may be added without a version bump; readers ignore keys they do not know.

Versions
    Writers write ``FORMAT_VERSION``; readers accept the versions in ``READABLE_VERSIONS`` and refuse
    every other, naming it. Bump ``FORMAT_VERSION`` (and say here what changed) when an older reader
    would misread a new file: a required key added, removed, renamed or retyped, a key's meaning or
    unit changed, or the module's exported methods changed. A reader that can still read the old
    version keeps it in ``READABLE_VERSIONS``. Adding an optional key needs no bump.

    1: the format above. (The value checks on ``pooling``, ``output``, ``validation`` and the fc
    layer's width came later without a bump: the exporter always wrote them so, and a file that
    broke them could not be served.)

The compiled package, ``<name>.pt2`` beside ``<name>.pt`` (optional; ``model.compile`` writes it)
    A PT2 archive as ``torch.export.pt2_archive`` writes it (a zip under one root folder): two
    AOTInductor models compiled ahead of time from the same network, ``forward`` (x -> probs) and
    ``features`` (x -> (probs, one tensor per entry of ``layer_names``, in order)), for batches of 1
    to ``compiled.max_batch``, and ``<root>/extra/metadata.json``: the ``.pt``'s metadata, key for
    key, plus ``compiled`` (``COMPILED_FIELDS``): ``source_sha256`` of the ``.pt`` file it was compiled
    from, ``device`` ("cpu"), ``cpu_isa`` (the vector instructions its kernels use: "avx512",
    "avx2", ... or "" for none), ``max_batch`` and ``torch_version`` (the package runs only under that
    torch). It is an accelerator of its ``.pt``, never a model of its own: a reader serves it only
    beside the ``.pt`` it names, and explanations and filters still come from the ``.pt``. Shared
    objects run native code: load only packages you trust, made on the kind of machine that serves.
    The optional key ``compiled`` needed no format bump.

This module needs only the standard library (the client-only install has no torch): it reads,
checks and encodes metadata; loading the module itself is the server's (``server/models.py``).
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

FORMAT_VERSION = 1
READABLE_VERSIONS = (1,)
METADATA_FILE = "metadata.json"  # the name given to torch.jit.save's _extra_files
EXTRA_DIR = "extra"  # where torch.jit.save puts extra files inside the archive's root folder
ARTIFACT_SUFFIX = ".pt"
COMPILED_SUFFIX = ".pt2"  # the compiled package beside an artifact
COMPILED_FORWARD, COMPILED_FEATURES = "forward", "features"  # the package's two models
COMPILED_FIELDS: dict[str, type] = {"source_sha256": str, "device": str, "cpu_isa": str, "max_batch": int,
                                    "torch_version": str}
FEATURES_METHOD = "forward_with_features"
LAYER_NAMES_ATTR = "layer_names"
EXPORTED_NAMES = (FEATURES_METHOD, LAYER_NAMES_ATTR)  # beyond forward: what consumers call or read
REQUIRED_KEYS: dict[str, type] = {"format_version": int, "name": str, "version": str, "class_names": list,
                                  "input": dict, "layers": list}
OPTIONAL_KEYS: dict[str, tuple[type, ...]] = {
    "pooling": (dict,), "output": (dict,), "architecture": (dict,), "flops_per_image": (int,), "parameters": (int,),
    "torch_version": (str,), "dataset": (dict,), "training": (dict,), "validation": (dict, type(None)),
    "compiled": (dict,)}
INPUT_DTYPE = "uint8"


class ArtifactFormatError(ValueError):
    """A file that is not an artifact of a format this code reads; the message names the file."""


def _json_type(value: Any) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
             dict: "an object", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _is(value: Any, types: tuple[type, ...]) -> bool:
    # JSON true/false are Python bools, which are ints too: never accept one where an int is asked for.
    return isinstance(value, types) and not (isinstance(value, bool) and bool not in types)


def _positive_ints(value: Any) -> bool:
    return isinstance(value, list) and all(_is(v, (int,)) and v > 0 for v in value)


def check_metadata(metadata: str | bytes | dict | None, source: str | Path) -> dict:
    """The metadata as a dict, once it is known to be of a readable version with every required key
    well typed; raises ``ArtifactFormatError`` naming ``source`` (the file) and the problem otherwise.
    ``metadata`` is the raw ``metadata.json`` text (``None`` or empty: the file had none) or a dict."""
    where = f"{source}: {METADATA_FILE}"
    if metadata is None or (isinstance(metadata, (str, bytes)) and not metadata.strip()):
        raise ArtifactFormatError(f"{source}: no {METADATA_FILE} inside; not an artifact of this format "
                                  f"(write it with model.export.export_torchscript)")
    if isinstance(metadata, (str, bytes)):
        try:
            metadata = json.loads(metadata)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ArtifactFormatError(f"{where} is not JSON: {exc}") from None
    if not isinstance(metadata, dict):
        raise ArtifactFormatError(f"{where} is {_json_type(metadata)}, not a JSON object")
    readable = ", ".join(map(str, READABLE_VERSIONS))
    if "format_version" not in metadata:
        raise ArtifactFormatError(f"{where} has no format_version; this code reads format version {readable}")
    version = metadata["format_version"]
    if not _is(version, (int,)):
        raise ArtifactFormatError(f"{where}: format_version is {_json_type(version)} ({version!r}), not an "
                                  f"integer; this code reads format version {readable}")
    if version not in READABLE_VERSIONS:
        newer = "; newer code wrote it: upgrade this reader" if version > max(READABLE_VERSIONS) else ""
        raise ArtifactFormatError(f"{where}: format_version {version}, but this code reads format version "
                                  f"{readable} only{newer}")
    for key, kind in REQUIRED_KEYS.items():
        if key not in metadata:
            raise ArtifactFormatError(f"{where} lacks the required key {key!r}")
        if not _is(metadata[key], (kind,)):
            raise ArtifactFormatError(f"{where}: {key!r} is {_json_type(metadata[key])}, expected "
                                      f"{_json_type(kind())}")
    for key, kinds in OPTIONAL_KEYS.items():
        if key in metadata and not _is(metadata[key], kinds):
            expected = " or ".join(_json_type(k()) for k in kinds)
            raise ArtifactFormatError(f"{where}: {key!r} is {_json_type(metadata[key])}, expected {expected}")
    _check_body(metadata, where)
    return metadata


def _check_body(metadata: dict, where: str) -> None:
    names = metadata["class_names"]
    if not names or not all(isinstance(n, str) for n in names):
        raise ArtifactFormatError(f"{where}: 'class_names' must be a non-empty list of strings")
    shape, dtype = metadata["input"].get("shape"), metadata["input"].get("dtype")
    if not (isinstance(shape, list) and len(shape) == 4 and shape[0] == -1 and _positive_ints(shape[1:])):
        raise ArtifactFormatError(f"{where}: 'input.shape' is {shape!r}, expected [-1, C, H, W]")
    if dtype != INPUT_DTYPE:
        raise ArtifactFormatError(f"{where}: 'input.dtype' is {dtype!r}, expected {INPUT_DTYPE!r}")
    layers = metadata["layers"]
    if not layers:
        raise ArtifactFormatError(f"{where}: 'layers' is empty")
    seen: set[str] = set()
    for i, row in enumerate(layers):
        if not isinstance(row, dict):
            raise ArtifactFormatError(f"{where}: layers[{i}] is {_json_type(row)}, expected an object")
        for key in ("name", "kind"):
            if not isinstance(row.get(key), str):
                raise ArtifactFormatError(f"{where}: layers[{i}] needs a string {key!r}")
        if not _positive_ints(row.get("output_shape")) or not row["output_shape"]:
            raise ArtifactFormatError(f"{where}: layers[{i}] ({row['name']}): 'output_shape' must be a "
                                      f"list of positive integers")
        for key in ("flops", "kernel", "stride", "padding"):
            if key in row and not _is(row[key], (int,)):
                raise ArtifactFormatError(f"{where}: layers[{i}] ({row['name']}): {key!r} must be an integer")
        if row["name"] in seen:
            raise ArtifactFormatError(f"{where}: layer name {row['name']!r} appears twice")
        seen.add(row["name"])
    _check_scores(metadata, where)
    _check_optional(metadata, where)


def _check_scores(metadata: dict, where: str) -> None:
    # The server names each score by its index into class_names: fewer names than scores made every call fail.
    classes = len(metadata["class_names"])
    fc = [row for row in metadata["layers"] if row["kind"] == "fc"]
    if not fc:
        raise ArtifactFormatError(f"{where}: 'layers' has no layer of kind 'fc'; the last one gives the scores")
    if fc[-1]["output_shape"] != [classes]:
        raise ArtifactFormatError(f"{where}: {classes} class_names, but the last fc layer ({fc[-1]['name']}) "
                                  f"has output_shape {fc[-1]['output_shape']}; expected [{classes}]")
    output = metadata.get("output", {})
    if "shape" in output and output["shape"] != [-1, classes]:
        raise ArtifactFormatError(f"{where}: 'output.shape' is {output['shape']!r}; {classes} class_names "
                                  f"need [-1, {classes}]")


# key -> (types, least value): the optional objects' fields that readers put into typed messages
_POOLING_FIELDS = {"kind": ((str,), None), "window": ((int,), 1), "stride": ((int,), 1), "padding": ((int,), 0)}
_VALIDATION_FIELDS = {"accuracy": ((int, float, type(None)), 0), "accuracy_flip_tta": ((int, float, type(None)), 0),
                      "images": ((int, type(None)), 0), "split_seed": ((int, type(None)), None)}


def _check_optional(metadata: dict, where: str) -> None:
    for key, fields in (("pooling", _POOLING_FIELDS), ("validation", _VALIDATION_FIELDS)):
        section = metadata.get(key) or {}
        for name, (types, least) in fields.items():
            if name not in section:
                continue
            value = section[name]
            expected = " or ".join(_json_type(t()) for t in types)
            if not _is(value, types):
                raise ArtifactFormatError(f"{where}: '{key}.{name}' is {_json_type(value)} ({value!r}), "
                                          f"expected {expected}")
            if least is not None and value is not None and not isinstance(value, str) and value < least:
                raise ArtifactFormatError(f"{where}: '{key}.{name}' is {value!r}, expected at least {least}")
    output = metadata.get("output", {})
    if "kind" in output and not isinstance(output["kind"], str):
        raise ArtifactFormatError(f"{where}: 'output.kind' is {_json_type(output['kind'])}, expected a string")
    compiled = metadata.get("compiled")
    if compiled:
        for name, kind in COMPILED_FIELDS.items():
            if not _is(compiled.get(name), (kind,)):
                raise ArtifactFormatError(f"{where}: 'compiled.{name}' is {_json_type(compiled.get(name))}, "
                                          f"expected {_json_type(kind())}")
        if compiled["max_batch"] < 1:
            raise ArtifactFormatError(f"{where}: 'compiled.max_batch' is {compiled['max_batch']}, expected at least 1")
    source = (metadata.get("dataset") or {}).get("source")
    if source is not None and not isinstance(source, str):
        raise ArtifactFormatError(f"{where}: 'dataset.source' is {_json_type(source)}, expected a string")


def encode_metadata(metadata: dict) -> str:
    """The ``metadata.json`` text for ``metadata``, checked first, so no writer ships a file its
    readers refuse. Pass it to ``torch.jit.save(..., _extra_files={METADATA_FILE: text})``."""
    if metadata.get("format_version") != FORMAT_VERSION:
        raise ArtifactFormatError(f"metadata to write has format_version {metadata.get('format_version')!r}; "
                                  f"writers write {FORMAT_VERSION}")
    check_metadata(metadata, "metadata to write")
    return json.dumps(metadata, indent=1)


def read_raw_metadata(path: str | Path) -> bytes | None:
    """The bytes of ``<root>/extra/metadata.json`` inside the archive at ``path``; ``None`` if it has none."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = [n for n in archive.namelist() if n.split("/")[1:] == [EXTRA_DIR, METADATA_FILE]]
            if len(names) > 1:
                raise ArtifactFormatError(f"{path}: {len(names)} {METADATA_FILE} files inside, expected one")
            return archive.read(names[0]) if names else None
    except (zipfile.BadZipFile, zipfile.LargeZipFile) as exc:
        raise ArtifactFormatError(f"{path}: not a TorchScript archive ({exc})") from None
    except OSError as exc:
        raise ArtifactFormatError(f"{path}: cannot read: {exc.strerror or exc}") from None


def read_metadata(path: str | Path) -> dict:
    """The checked metadata of the artifact at ``path``, without torch; raises ``ArtifactFormatError``."""
    return check_metadata(read_raw_metadata(path), path)
