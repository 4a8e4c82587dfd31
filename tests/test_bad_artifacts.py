"""Artifacts whose metadata passes the format's type checks but that the server cannot serve (security
review, issue 28): a real server process on a directory holding one exits non-zero at start-up with
one ``cannot start: <file>: ...`` line and no traceback, rather than crashing or failing every call."""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import pytest

from cifar10_serving.protos import artifact
from cifar10_serving.server.launcher import ServerProcess, ServerStartError
from tests.helpers.servers import server_args

pytestmark = pytest.mark.system  # server processes

START_SECONDS = 120  # importing torch and loading on 2 shared cores

# name -> (change to the metadata, words the refusal must contain)
BAD = {
    "huge-input": (lambda m: {**m, "input": {**m["input"], "shape": [-1, 3, 100_000, 100_000]}},
                   ["100000x100000", "at most 1024x1024"]),
    "three-classes": (lambda m: {**m, "class_names": m["class_names"][:3]},
                      ["3 class_names", "classifier.fc", "[10]"]),
    "window-two": (lambda m: {**m, "pooling": {**m["pooling"], "window": "two"}},
                   ["'pooling.window' is a string", "expected an integer"]),
}


def rewrite_metadata(source: Path, target: Path, change) -> Path:
    """A copy of the artifact ``source`` at ``target`` whose metadata.json is ``change(metadata)``,
    written as is (no check), every other member byte for byte."""
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w", zipfile.ZIP_STORED) as new:
        for info in old.infolist():
            data = old.read(info)
            if info.filename.split("/")[1:] == [artifact.EXTRA_DIR, artifact.METADATA_FILE]:
                data = json.dumps(change(json.loads(data))).encode()
            new.writestr(info, data)
    return target


@pytest.mark.parametrize("case", sorted(BAD))
def test_the_server_refuses_to_start_on_metadata_it_cannot_serve(tmp_path, tiny_models_dir, case):
    change, words = BAD[case]
    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(tiny_models_dir / "tiny-max.pt", models)  # the default model, good
    bad = rewrite_metadata(tiny_models_dir / "tiny-avg.pt", models / f"{case}.pt", change)
    server = ServerProcess(server_args(models, metrics_port=-1), wait=False)
    try:
        server.wait_ready(START_SECONDS)
    except ServerStartError:
        pass
    else:
        server.stop()
        pytest.fail(f"the server started serving {bad}")
    assert server.returncode not in (0, None), server.log
    refusals = [line for line in server.log.splitlines() if f"cannot start: {bad}: " in line]
    assert len(refusals) == 1, server.log
    assert "Traceback" not in server.log, server.log
    for word in words:
        assert word in refusals[0], (word, refusals[0])
