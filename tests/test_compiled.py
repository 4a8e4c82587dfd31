"""The compiled package beside an artifact (``NAME.pt2``, ``python -m model.compile``, docs/compiled.md):
the server serves it for the passes it is meant for, with the TorchScript's answers and feature maps,
lets go of the GIL while it runs, and refuses a package that does not belong to its ``.pt`` as it
refuses a bad ``.pt``: by name, before serving."""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from cifar10_serving.client import ClassifierClient
from cifar10_serving.protos import artifact
from cifar10_serving.server.models import ModelLoadError, load_artifact
from tests.helpers.models import export_tiny
from cifar10_serving.server.launcher import ServerProcess
from tests.helpers.servers import RunningServer, make_config, refused_start, server_args

pytestmark = pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                                reason="compiling a package needs a C++ compiler (.ci/run installs g++)")
CPU = torch.device("cpu")
MAX_BATCH = 16
SERVER_EXIT_SECONDS = 120


@pytest.fixture(scope="module")
def compiled_dir(tmp_path_factory) -> Path:
    """tiny-max.pt and its compiled package, for batches up to 16 (about 30 s on the 2-core VM)."""
    from cifar10_serving.model.compile import compile_artifact

    folder = tmp_path_factory.mktemp("compiled")
    compile_artifact(export_tiny(folder, "tiny-max"), max_batch=MAX_BATCH)
    return folder


def copy_pair(source: Path, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for suffix in (artifact.ARTIFACT_SUFFIX, artifact.COMPILED_SUFFIX):
        shutil.copy(source / f"tiny-max{suffix}", folder / f"tiny-max{suffix}")
    return folder / "tiny-max.pt"


def rewrite_metadata(package: Path, change) -> None:
    """The package with its metadata.json replaced by ``change(metadata)`` (a dict, or text as is)."""
    with zipfile.ZipFile(package) as old:
        members = [(info, old.read(info)) for info in old.infolist()]
    with zipfile.ZipFile(package, "w") as new:
        for info, data in members:
            if info.filename.endswith(f"/extra/{artifact.METADATA_FILE}"):
                changed = change(json.loads(data))
                data = changed if isinstance(changed, (str, bytes)) else json.dumps(changed)
            new.writestr(info, data)


def test_the_package_gives_the_torchscripts_scores_and_every_layer(compiled_dir):
    model = load_artifact(compiled_dir / "tiny-max.pt", CPU, compiled_runners=1)
    assert model.compiled is not None and model.compiled.max_batch == MAX_BATCH
    x = torch.randint(0, 256, (MAX_BATCH, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        want, want_features = model.module.forward_with_features(x, model.layer_names)
        got = model.compiled(x)
        got_too, features = model.compiled.forward_with_features(x, model.layer_names[:2])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got_too, want, rtol=1e-4, atol=1e-5)
    assert list(features) == model.layer_names[:2]  # the layers asked for, not all 20-odd the package returns
    for name in features:
        torch.testing.assert_close(features[name], want_features[name], rtol=1e-4, atol=1e-4)


def test_a_compiled_pass_lets_other_threads_run(compiled_dir):
    """torch's own runner of AOTInductor models holds the GIL for the whole pass, which stops the event
    loop for as long; the server's runner lets go of it. Counted, not timed: with a switch interval of
    a minute no thread is made to give the GIL up, so the main thread's counter moves during a pass
    only if the pass let go of it."""
    model = load_artifact(compiled_dir / "tiny-max.pt", CPU, compiled_runners=1)
    x = torch.zeros(MAX_BATCH, 3, 32, 32, dtype=torch.uint8)
    counter, moved, done = [0], [], threading.Event()

    def work():
        torch.set_num_threads(1)
        with torch.inference_mode():
            for _ in range(20):
                before = counter[0]
                model.compiled.forward_with_features(x, model.layer_names)
                moved.append(counter[0] - before)
        done.set()

    interval = sys.getswitchinterval()
    sys.setswitchinterval(60)
    try:
        worker = threading.Thread(target=work)
        worker.start()
        while not done.is_set():
            counter[0] += 1
            time.sleep(0.0002)  # lets go of the GIL, so the worker can start its passes
        worker.join()
    finally:
        sys.setswitchinterval(interval)
    assert sum(1 for m in moved if m > 0) >= len(moved) // 2, moved


def test_the_server_runs_the_passes_of_its_rungs_with_the_package_and_answers_the_same(compiled_dir, tmp_path):
    """One-thread passes from --compiled-min-batch, wider ones from --compiled-min-batch-wide."""
    copy_pair(compiled_dir, tmp_path / "models")
    server = RunningServer(make_config(tmp_path / "models", compiled_min_batch=4, max_batch_size=MAX_BATCH))
    try:
        metrics = server.app.core.metrics
        passes = metrics.compiled_passes.labels("tiny-max")
        reference = load_artifact(tmp_path / "models" / "tiny-max.pt", CPU)
        images = np.random.default_rng(2).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)  # H x W x C, as sent
        with ClassifierClient(server.target, timeout=30) as client:
            before = passes._value.get()
            one = client.classify(list(images[:1]), model="tiny-max")  # a pass of 1: the TorchScript's
            assert passes._value.get() == before
            six = client.classify(list(images), model="tiny-max", layers=["stage1.conv1"])  # rung 6: the package's
            assert passes._value.get() == before + 1
        with torch.inference_mode():
            want, features = reference.module.forward_with_features(
                torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), ["stage1.conv1"])
        np.testing.assert_allclose(one[0].probabilities, want[0].numpy(), rtol=1e-4, atol=1e-5)
        for i, answer in enumerate(six):
            np.testing.assert_allclose(answer.probabilities, want[i].numpy(), rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(answer.feature_maps["stage1.conv1"], features["stage1.conv1"][i].numpy(),
                                       rtol=1e-4, atol=1e-4)
    finally:
        server.stop()
    # A lone pass on an idle server takes every thread: the wide rule holds for it.
    server = RunningServer(make_config(tmp_path / "models", compiled_min_batch=2, compiled_min_batch_wide=8,
                                       max_batch_size=MAX_BATCH, torch_threads=2))
    try:
        passes = server.app.core.metrics.compiled_passes.labels("tiny-max")
        with ClassifierClient(server.target, timeout=30) as client:
            before = passes._value.get()
            client.classify(list(images), model="tiny-max")  # 6 images on two threads: the TorchScript's
            assert passes._value.get() == before
            client.classify(list(np.concatenate([images, images[:2]])), model="tiny-max")  # 8: the package's
            assert passes._value.get() == before + 1
    finally:
        server.stop()


def test_compiled_min_batch_zero_leaves_the_package_unread(compiled_dir, tmp_path):
    pt = copy_pair(compiled_dir, tmp_path / "models")
    pt.with_suffix(artifact.COMPILED_SUFFIX).write_bytes(b"not a package")  # would be refused if it were read
    assert load_artifact(pt, CPU, compiled_runners=0).compiled is None


# name -> (how the pair is spoiled, words the refusal must contain)
BAD = {
    "metadata-differs": (lambda pt: rewrite_metadata(pt.with_suffix(".pt2"), lambda m: {**m, "version": "other"}),
                         ["differs from tiny-max.pt's in version"]),
    "no-compiled-section": (lambda pt: rewrite_metadata(pt.with_suffix(".pt2"),
                                                        lambda m: {k: v for k, v in m.items() if k != "compiled"}),
                            ["no 'compiled' section", "python -m model.compile"]),
    "compiled-mistyped": (lambda pt: rewrite_metadata(pt.with_suffix(".pt2"),
                                                      lambda m: {**m, "compiled": {**m["compiled"], "max_batch": "16"}}),
                          ["'compiled.max_batch' is a string"]),
    "other-torch": (lambda pt: rewrite_metadata(pt.with_suffix(".pt2"), lambda m: {
        **m, "compiled": {**m["compiled"], "torch_version": "1.0"}}), ["by torch 1.0", "compile it again here"]),
    "other-cpu": (lambda pt: rewrite_metadata(pt.with_suffix(".pt2"), lambda m: {
        **m, "compiled": {**m["compiled"], "cpu_isa": "amx_tile"}}), ["compiled for amx_tile", "this CPU lacks"]),
    "retrained-pt": (lambda pt: export_tiny(pt.parent, "tiny-max", seed=7), ["compiled from a file with sha256",
                                                                           "not from tiny-max.pt"]),
    "no-metadata": (lambda pt: rewrite_metadata(pt.with_suffix(".pt2"), lambda m: ""), ["no metadata.json"]),
    "not-a-zip": (lambda pt: pt.with_suffix(".pt2").write_bytes(b"\x7fELF not a package"), ["not a TorchScript archive"]),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_package_that_is_not_its_artifacts_is_refused_naming_it(compiled_dir, tmp_path, case):
    pt = copy_pair(compiled_dir, tmp_path / "models")
    spoil, words = BAD[case]
    spoil(pt)
    if case == "other-cpu" and "amx_tile" in Path("/proc/cpuinfo").read_text():
        pytest.skip("this CPU has AMX: no instruction set here that it lacks")
    with pytest.raises(ModelLoadError) as refusal:
        load_artifact(pt, CPU, compiled_runners=1)
    assert str(pt.with_suffix(".pt2")) in str(refusal.value)
    for word in words:
        assert word in str(refusal.value), (word, str(refusal.value))


@pytest.mark.system
def test_the_server_refuses_to_start_on_a_package_that_is_not_its_artifacts(compiled_dir, tmp_path):
    pt = copy_pair(compiled_dir, tmp_path / "models")
    BAD["retrained-pt"][0](pt)
    stderr = refused_start(pt.parent, tmp_path, SERVER_EXIT_SECONDS)
    assert str(pt.with_suffix(".pt2")) in stderr, stderr
    digest = hashlib.sha256(pt.read_bytes()).hexdigest()[:12]
    assert digest in stderr, stderr


@pytest.mark.system
def test_poll_mode_takes_up_a_package_put_beside_a_serving_model(compiled_dir, tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(compiled_dir / "tiny-max.pt", models / "tiny-max.pt")
    image = np.zeros((32, 32, 3), dtype=np.uint8)
    with ServerProcess(server_args(models, model_control_mode="poll", repository_poll_seconds=0.3,
                                   compiled_min_batch=1, compiled_min_batch_wide=1)) as server, \
            ClassifierClient(server.target, timeout=30) as client:
        client.classify([image], model="tiny-max")
        assert server.metric_sum("cifar10_compiled_passes_total", model="tiny-max") == 0
        shutil.copy(compiled_dir / "tiny-max.pt2", models / "tiny-max.pt2")
        deadline = time.monotonic() + 60
        while server.metric_sum("cifar10_compiled_passes_total", model="tiny-max") == 0:
            assert time.monotonic() < deadline, "the package was not taken up within 60 s"
            client.classify([image], model="tiny-max")  # answered all along, by one runtime or the other
            time.sleep(0.2)
