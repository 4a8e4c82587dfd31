"""The artifact format (``protos/artifact.py``): what the exporter writes the server and the torch-free
reader accept, and files of another format are refused, by name, before the server starts serving."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from cifar10_serving.model.export import build_metadata, export_torchscript, load_scripted
from cifar10_serving.model.network import CifarNet, NetConfig
from cifar10_serving.protos import artifact
from cifar10_serving.server.models import ModelLoadError, load_artifact
from tests.helpers.models import TINY_WIDTHS, export_tiny
from tests.helpers.servers import refused_start

ROOT = Path(__file__).resolve().parent.parent
CPU = torch.device("cpu")
SERVER_EXIT_SECONDS = 120  # importing torch and loading on 2 shared cores; a server that serves never exits


@pytest.fixture(scope="module")
def tiny():
    """A tiny network, scripted, and the metadata the exporter would write for it."""
    net = CifarNet(NetConfig(widths=TINY_WIDTHS)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.script(net)
    return scripted, build_metadata(net, "tiny", "test")


def save_raw(path: Path, scripted, metadata_text: str | None) -> Path:
    """The module saved with ``metadata_text`` as its metadata.json, unchecked (None: no metadata at all)."""
    extra = {} if metadata_text is None else {artifact.METADATA_FILE: metadata_text}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(scripted, str(path), _extra_files=extra)
    return path


def without(metadata: dict, key: str) -> dict:
    return {k: v for k, v in metadata.items() if k != key}


# name -> (metadata.json text, or None for none; words the refusal must contain)
BAD = {
    "version-99": (lambda m: json.dumps({**m, "format_version": 99}), ["format_version 99", "reads format version 1", "newer"]),
    "version-string": (lambda m: json.dumps({**m, "format_version": "1"}), ["format_version", "not an integer",
                                                                            "'1'", "reads format version 1"]),
    "version-bool": (lambda m: json.dumps({**m, "format_version": True}), ["format_version", "a boolean"]),
    "no-version": (lambda m: json.dumps(without(m, "format_version")), ["no format_version"]),
    "no-metadata": (lambda m: None, ["no metadata.json"]),
    "not-json": (lambda m: "{name: tiny", ["metadata.json is not JSON"]),
    "no-class-names": (lambda m: json.dumps(without(m, "class_names")), ["lacks", "'class_names'"]),
    "layers-mistyped": (lambda m: json.dumps({**m, "layers": {"stage1.conv1": {}}}), ["'layers' is an object",
                                                                                       "expected a list"]),
    "bad-input-shape": (lambda m: json.dumps({**m, "input": {**m["input"], "shape": [3, 32, 32]}}),
                        ["'input.shape'", "[-1, C, H, W]"]),
    "three-class-names": (lambda m: json.dumps({**m, "class_names": m["class_names"][:3]}),
                          ["3 class_names", "classifier.fc", "expected [3]"]),
    "pooling-window-string": (lambda m: json.dumps({**m, "pooling": {**m["pooling"], "window": "two"}}),
                              ["'pooling.window' is a string", "expected an integer"]),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_files_of_another_format_are_refused_naming_the_file_and_the_problem(tmp_path, tiny, case):
    scripted, metadata = tiny
    make, words = BAD[case]
    path = save_raw(tmp_path / f"{case}.pt", scripted, make(metadata))
    with pytest.raises(ModelLoadError) as server_refusal:
        load_artifact(path, CPU)
    with pytest.raises(artifact.ArtifactFormatError) as reader_refusal:
        artifact.read_metadata(path)
    for message in (str(server_refusal.value), str(reader_refusal.value)):
        assert str(path) in message
        for word in words:
            assert word in message, (word, message)
    with pytest.raises(artifact.ArtifactFormatError, match=artifact.METADATA_FILE):
        load_scripted(path)  # model/'s own reader applies the same check


def test_what_the_exporter_writes_the_server_and_the_torch_free_reader_accept(tmp_path):
    path = export_tiny(tmp_path, "tiny-max")
    served = load_artifact(path, CPU)
    read = artifact.read_metadata(path)
    assert served.name == read["name"] == "tiny-max" and served.version == read["version"] == "test"
    assert read["format_version"] == artifact.FORMAT_VERSION
    assert served.metadata == read and served.layer_names == list(served.module.layer_names)
    with torch.no_grad():  # still a working model after the checks and the server's freezing
        probs, feats = served.module.forward_with_features(torch.zeros(1, 3, 32, 32, dtype=torch.uint8),
                                                          ["classifier.fc"])
    assert probs.shape == (1, 10) and set(feats) == {"classifier.fc"}
    # The reader needs no torch: a process where importing torch fails reads the same metadata.
    code = ("import sys, json\nsys.modules['torch'] = None  # any import of torch now raises ImportError\n"
            "from cifar10_serving.protos import artifact\n"
            f"print(json.dumps(artifact.read_metadata({str(path)!r})))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == read


def test_the_shipped_models_are_of_the_current_format():
    shipped = sorted((ROOT / "model" / "artifacts").glob("*" + artifact.ARTIFACT_SUFFIX))
    assert shipped
    for path in shipped:
        assert artifact.read_metadata(path)["format_version"] in artifact.READABLE_VERSIONS, path


def test_the_exporter_refuses_to_write_metadata_its_readers_would_refuse(tmp_path, tiny):
    _, metadata = tiny
    net = CifarNet(NetConfig(widths=TINY_WIDTHS))
    for bad, word in ((without(metadata, "name"), "'name'"), ({**metadata, "format_version": 0}, "format_version")):
        with pytest.raises(artifact.ArtifactFormatError, match=word):
            export_torchscript(net, tmp_path / "bad.pt", bad)
        assert not (tmp_path / "bad.pt").exists()


def test_a_module_whose_layers_differ_from_its_metadata_is_refused(tmp_path, tiny):
    scripted, metadata = tiny
    short = [row for row in metadata["layers"] if row["name"] != "head.flatten"]  # the fc layer stays
    path = save_raw(tmp_path / "short.pt", scripted, json.dumps({**metadata, "layers": short}))
    with pytest.raises(ModelLoadError, match="layer_names .* are not the layers") as refusal:
        load_artifact(path, CPU)
    assert str(path) in str(refusal.value)


def test_a_file_that_is_not_an_archive_is_refused(tmp_path):
    path = tmp_path / "junk.pt"
    path.write_bytes(b"not a zip archive at all")
    with pytest.raises(ModelLoadError, match="not a TorchScript archive") as refusal:
        load_artifact(path, CPU)
    assert str(path) in str(refusal.value)


def test_the_specification_names_every_key_the_code_checks_and_the_exporter_writes(tiny):
    _, metadata = tiny
    spec = artifact.__doc__
    keys = {*artifact.REQUIRED_KEYS, *artifact.OPTIONAL_KEYS}
    for key in keys | {artifact.METADATA_FILE, *artifact.EXPORTED_NAMES}:
        assert f"``{key}" in spec, key
    written = set(build_metadata(CifarNet(NetConfig(widths=TINY_WIDTHS)), "x", "1", dataset={}, training={},
                                 validation=None))
    assert written <= keys, written - keys
    assert f"\n    {artifact.FORMAT_VERSION}: " in spec  # the version history names the current version


@pytest.mark.system
@pytest.mark.parametrize("case", ["version-99", "no-metadata"])
def test_the_server_refuses_to_start_on_a_file_of_another_format(tmp_path, tiny, case):
    scripted, metadata = tiny
    models = tmp_path / "models"
    models.mkdir()
    export_tiny(models, "tiny-max")  # a good model beside it does not make the bad one acceptable
    make, words = BAD[case]
    bad = save_raw(models / "zz-bad.pt", scripted, make(metadata))
    stderr = refused_start(models, tmp_path, SERVER_EXIT_SECONDS)
    assert str(bad) in stderr, stderr
    for word in words:
        assert word in stderr, (word, stderr)
