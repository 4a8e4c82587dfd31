"""The model repository against real server processes (issue 29): a new version dropped into the
folder (poll) or loaded by call (explicit) takes over under load with no call failing and each
caller's answers flipping version once; unload under load fails no call in flight; a corrupt
version leaves the old one serving and says why; load/unload cycles give their memory back; every
bad repository call gets its code; and NVIDIA's tritonclient reads the index, the statistics and the
configuration unchanged. In process, quicker: the version policies, poll mode following only the
models --load-models names and unloading a removed version, a corrupt version loaded by call, and
the load metrics."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
import zipfile
from pathlib import Path

import grpc
import pytest
from prometheus_client import CollectorRegistry

from cifar10_serving.client import ClassifierClient
from cifar10_serving.client.cli import main as cli_main
from cifar10_serving.protos import artifact
from cifar10_serving.protos.cifar10.v1 import classifier_pb2 as pb
from cifar10_serving.protos.cifar10.v1 import classifier_pb2_grpc as pb_grpc
from cifar10_serving.protos.inference import open_inference_grpc_pb2 as v2
from cifar10_serving.protos.inference import open_inference_grpc_pb2_grpc as v2_grpc
from cifar10_serving.server.launcher import ServerProcess
from tests.helpers.images import random_images
from tests.helpers.memory import rss
from tests.helpers.models import export_tiny
from tests.helpers.servers import RunningServer, make_config, server_args

pytestmark = pytest.mark.system  # server processes whose repository changes under load

CALLERS = 8
IMAGE = pb.Image(raw=pb.RawTensor(shape=[32, 32, 3], layout=pb.LAYOUT_HWC, data=random_images(1, seed=3)[0].tobytes()))
SCRIPT = Path(__file__).resolve().parent / "helpers" / "tritonclient_repository.py"


def publish(models_dir: Path, name: str, version: str, seed: int = 0, pool: str = "max") -> Path:
    """Writes ``name/version/model.pt`` as a release would: the file is made beside, then renamed in."""
    staging = models_dir / f".staging-{name}-{version}"
    staging.mkdir()
    export_tiny(staging, name, pool=pool, seed=seed, version=version, filename="model.pt")
    target = models_dir / name / version
    target.parent.mkdir(exist_ok=True)
    staging.rename(target)
    return target / "model.pt"


class Callers:
    """``CALLERS`` threads classifying (model ``name``) until stopped, each recording what it got."""

    def __init__(self, target: str, name: str = "", layers: tuple[str, ...] = ()) -> None:
        self.seen: list[list[tuple[float, float, str, str]]] = [[] for _ in range(CALLERS)]  # start, end, version, code
        self._stop = threading.Event()
        # 8 callers x 4 images with maps stay within the feature-map queue (one full batch of 64)
        request = pb.ClassifyRequest(model=name, images=[IMAGE] * (4 if layers else 1), feature_layers=layers)
        self._threads = [threading.Thread(target=self._run, args=(target, request, i)) for i in range(CALLERS)]
        for thread in self._threads:
            thread.start()

    def _run(self, target: str, request: pb.ClassifyRequest, i: int) -> None:
        with grpc.insecure_channel(target) as channel:
            stub = pb_grpc.ClassifierStub(channel)
            while not self._stop.is_set():
                start = time.monotonic()
                try:
                    version, code = stub.Classify(request, timeout=30).model_version, "OK"
                except grpc.RpcError as exc:
                    version, code = "", exc.code().name
                self.seen[i].append((start, time.monotonic(), version, code))

    def wait_for(self, version: str, timeout: float = 60.0) -> None:
        until = time.monotonic() + timeout
        while not all(any(v == version for _, _, v, _ in calls[-3:]) for calls in self.seen):
            assert time.monotonic() < until, f"not every caller reached version {version}"
            time.sleep(0.05)

    def stop(self) -> list[list[tuple[float, float, str, str]]]:
        time.sleep(0.3)
        self._stop.set()
        for thread in self._threads:
            thread.join(60)
        return self.seen


def assert_one_flip(seen, old: str, new: str) -> None:
    for calls in seen:
        codes = {code for *_, code in calls}
        assert codes == {"OK"}, codes
        versions = [v for _, _, v, _ in calls]
        flip = versions.index(new)
        assert set(versions[:flip]) <= {old} and set(versions[flip:]) == {new}, versions


def _index(channel) -> dict[tuple[str, str], tuple[str, str]]:
    index = v2_grpc.GRPCInferenceServiceStub(channel).RepositoryIndex(v2.RepositoryIndexRequest(), timeout=10)
    return {(m.name, m.version): (m.state, m.reason) for m in index.models}


def _wait(predicate, timeout: float = 60.0) -> None:
    until = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < until, "condition not reached in time"
        time.sleep(0.1)


# ----------------------------------------------------------------------------- taking over
def test_poll_a_new_version_takes_over_under_load_and_a_corrupt_one_changes_nothing(tmp_path):
    publish(tmp_path, "tiny-max", "1")
    with ServerProcess(server_args(tmp_path, model_control_mode="poll", repository_poll_seconds=0.3)) as server, \
            grpc.insecure_channel(server.target) as channel:
        callers = Callers(server.target)
        callers.wait_for("1")
        publish(tmp_path, "tiny-max", "2", seed=1)
        callers.wait_for("2")
        assert_one_flip(callers.stop(), "1", "2")
        _wait(lambda: _index(channel).get(("tiny-max", "1"), ("",))[0] == "UNAVAILABLE")
        assert _index(channel)[("tiny-max", "2")] == ("READY", "")

        bad = tmp_path / ".staging-bad"
        bad.mkdir()
        (bad / "model.pt").write_bytes(b"not a model")
        bad.rename(tmp_path / "tiny-max" / "3")
        callers = Callers(server.target)
        _wait(lambda: _index(channel).get(("tiny-max", "3"), ("",))[0] == "UNAVAILABLE")
        state, reason = _index(channel)[("tiny-max", "3")]
        assert str(tmp_path / "tiny-max" / "3" / "model.pt") in reason, reason
        seen = callers.stop()
        assert {v for calls in seen for _, _, v, _ in calls} == {"2"}  # the old one serves on
        assert {c for calls in seen for *_, c in calls} == {"OK"}
        assert server.metric_sum("cifar10_model_loads_total", model="tiny-max", outcome="failed") >= 1
        assert server.metric_sum("cifar10_model_state", model="tiny-max", version="2", state="READY") == 1


def test_explicit_a_version_loaded_by_call_takes_over_under_load(tmp_path):
    publish(tmp_path, "tiny-max", "1")
    with ServerProcess(server_args(tmp_path, model_control_mode="explicit")) as server, \
            grpc.insecure_channel(server.target) as channel:
        stub = v2_grpc.GRPCInferenceServiceStub(channel)
        callers = Callers(server.target)
        callers.wait_for("1")
        publish(tmp_path, "tiny-max", "2", seed=1)
        time.sleep(0.5)
        assert _index(channel).get(("tiny-max", "2")) is None  # explicit: nothing loads by itself
        stub.RepositoryModelLoad(v2.RepositoryModelLoadRequest(model_name="tiny-max"), timeout=120)
        assert _index(channel)[("tiny-max", "2")] == ("READY", "")  # the call returns once it serves
        callers.wait_for("2")
        assert_one_flip(callers.stop(), "1", "2")


def test_unload_under_load_fails_no_call_in_flight(tmp_path):
    publish(tmp_path, "tiny-max", "1")
    publish(tmp_path, "tiny-avg", "1", pool="avg")
    with ServerProcess(server_args(tmp_path, model_control_mode="explicit")) as server, \
            grpc.insecure_channel(server.target) as channel:
        stub = v2_grpc.GRPCInferenceServiceStub(channel)
        callers = Callers(server.target, "tiny-avg", layers=("*",))  # every map: calls that last
        callers.wait_for("1")
        asked = time.monotonic()
        stub.RepositoryModelUnload(v2.RepositoryModelUnloadRequest(model_name="tiny-avg"), timeout=60)
        unloaded = time.monotonic()
        assert not stub.ModelReady(v2.ModelReadyRequest(name="tiny-avg"), timeout=10).ready  # at once
        time.sleep(0.5)
        seen = [call for calls in callers.stop() for call in calls]
        # A call the client started before the unload may reach the server after it (then NOT_FOUND):
        # the ones in flight across it are those answered OK after the unload call returned.
        in_flight = [c for c in seen if c[0] < asked and c[1] > unloaded and c[3] == "OK"]
        after = [c for c in seen if c[0] > unloaded]
        print(f"{len(in_flight)} calls in flight across the unload, answered; {len(after)} sent after it")
        assert in_flight and all(v == "1" for _, _, v, _ in in_flight)
        assert after and all(code == "NOT_FOUND" for *_, code in after)
        assert {code for *_, code in seen} <= {"OK", "NOT_FOUND"}  # nothing cancelled, cut or failed
        with grpc.insecure_channel(server.target) as other:  # the other model never noticed
            assert pb_grpc.ClassifierStub(other).Classify(pb.ClassifyRequest(images=[IMAGE]), timeout=10).results
        _wait(lambda: _index(channel)[("tiny-avg", "1")] == ("UNAVAILABLE", "unloaded"))



def test_load_unload_cycles_give_their_memory_back(tmp_path):
    # A bundled model, not a tiny one: what a cycle could leak is the size of a real module and its kernels.
    bundled = Path(__file__).resolve().parent.parent / "model" / "artifacts" / "small-max.pt"
    (tmp_path / "small-max" / "1").mkdir(parents=True)
    shutil.copy(bundled, tmp_path / "small-max" / "1" / "model.pt")
    publish(tmp_path, "tiny-max", "1")
    meta = json.loads((bundled.with_suffix(".json")).read_text()) if bundled.with_suffix(".json").exists() else {}
    if meta.get("version", "1") != "1":
        pytest.skip("the bundled small-max is not version 1")
    with ServerProcess(server_args(tmp_path, model_control_mode="explicit")) as server, \
            grpc.insecure_channel(server.target) as channel:
        stub = v2_grpc.GRPCInferenceServiceStub(channel)
        classify = pb_grpc.ClassifierStub(channel).Classify

        def cycle() -> None:
            stub.RepositoryModelUnload(v2.RepositoryModelUnloadRequest(model_name="small-max"), timeout=60)
            _wait(lambda: _index(channel)[("small-max", "1")][0] == "UNAVAILABLE")
            stub.RepositoryModelLoad(v2.RepositoryModelLoadRequest(model_name="small-max"), timeout=120)
            assert classify(pb.ClassifyRequest(model="small-max", images=[IMAGE]), timeout=30).model_version == "1"

        cycle()  # the first cycle fills the allocator's caches and the kernel cache for good
        before = rss(server.pid)
        start = time.monotonic()
        for _ in range(20):
            cycle()
        grown = rss(server.pid) - before
        print(f"20 load/unload cycles of small-max: resident memory {grown / 2**20:+.1f} MiB, "
              f"{(time.monotonic() - start) / 20:.2f} s a cycle")
        assert grown < 100 * 2**20
        assert server.metric_sum("cifar10_model_loads_total", model="small-max", outcome="loaded") == 22


# ----------------------------------------------------------------------------- bad calls
@pytest.fixture(scope="module")
def explicit(tmp_path_factory):
    models = tmp_path_factory.mktemp("repository")
    publish(models, "tiny-max", "1")
    publish(models, "tiny-avg", "1", pool="avg")
    tokens = models.parent / "tokens"
    tokens.write_text("inference-token\n")
    admin = models.parent / "admin-tokens"
    admin.write_text("admin-token\n")
    with ServerProcess(server_args(models, model_control_mode="explicit", auth_token_file=tokens,
                                   admin_token_file=admin)) as server:
        yield server


def _code(call) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


@pytest.mark.parametrize("request_, token, code", [
    (v2.RepositoryModelLoadRequest(model_name="no-such"), "admin-token", grpc.StatusCode.NOT_FOUND),
    (v2.RepositoryModelLoadRequest(model_name="../tiny-max"), "admin-token", grpc.StatusCode.INVALID_ARGUMENT),
    (v2.RepositoryModelLoadRequest(model_name="tiny-max/1"), "admin-token", grpc.StatusCode.INVALID_ARGUMENT),
    (v2.RepositoryModelLoadRequest(model_name="/etc/passwd"), "admin-token", grpc.StatusCode.INVALID_ARGUMENT),
    (v2.RepositoryModelLoadRequest(model_name="tiny max"), "admin-token", grpc.StatusCode.INVALID_ARGUMENT),
    (v2.RepositoryModelLoadRequest(model_name="tiny-max", parameters={"config": v2.ModelRepositoryParameter(
        string_param="{}")}), "admin-token", grpc.StatusCode.INVALID_ARGUMENT),
    (v2.RepositoryModelLoadRequest(model_name="tiny-max", repository_name="other"), "admin-token",
     grpc.StatusCode.INVALID_ARGUMENT),
    (v2.RepositoryModelUnloadRequest(model_name="no-such"), "admin-token", grpc.StatusCode.NOT_FOUND),
    (v2.RepositoryModelLoadRequest(model_name="tiny-max"), "inference-token", grpc.StatusCode.PERMISSION_DENIED),
    (v2.RepositoryModelUnloadRequest(model_name="tiny-max"), "inference-token", grpc.StatusCode.PERMISSION_DENIED),
    (v2.RepositoryModelLoadRequest(model_name="tiny-max"), "wrong", grpc.StatusCode.UNAUTHENTICATED),
    (v2.RepositoryModelLoadRequest(model_name="tiny-max"), None, grpc.StatusCode.UNAUTHENTICATED),
])
def test_every_bad_repository_call_gets_its_code_and_changes_nothing(explicit, request_, token, code):
    metadata = [("authorization", f"Bearer {token}")] if token else []
    with grpc.insecure_channel(explicit.target) as channel:
        stub = v2_grpc.GRPCInferenceServiceStub(channel)
        call = stub.RepositoryModelLoad if isinstance(request_, v2.RepositoryModelLoadRequest) else \
            stub.RepositoryModelUnload
        assert _code(lambda: call(request_, timeout=60, metadata=metadata)) == code
        ready = stub.ModelReady(v2.ModelReadyRequest(name="tiny-max"), timeout=10,
                                metadata=[("authorization", "Bearer inference-token")])
        assert ready.ready


def test_repository_calls_in_none_and_poll_mode_are_failed_precondition(tiny_models_dir, tmp_path):
    publish(tmp_path, "tiny-max", "1")
    for models, mode in ((tiny_models_dir, "none"), (tmp_path, "poll")):
        with ServerProcess(server_args(models, model_control_mode=mode)) as server, \
                grpc.insecure_channel(server.target) as channel:
            stub = v2_grpc.GRPCInferenceServiceStub(channel)
            for call, request in ((stub.RepositoryModelLoad, v2.RepositoryModelLoadRequest(model_name="tiny-max")),
                                  (stub.RepositoryModelUnload, v2.RepositoryModelUnloadRequest(model_name="tiny-max"))):
                assert _code(lambda: call(request, timeout=30)) == grpc.StatusCode.FAILED_PRECONDITION
            assert ("tiny-max", "1" if mode == "poll" else "test") in _index(channel)  # the index answers in every mode


def test_a_request_can_name_a_version_and_the_api_lists_every_version(tmp_path, capsys):
    publish(tmp_path, "tiny-max", "1")
    publish(tmp_path, "tiny-max", "2", seed=1)
    with ServerProcess(server_args(tmp_path, version_policy="all")) as server, \
            grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.ClassifierStub(channel)
        for version in ("1", "2"):
            answer = stub.Classify(pb.ClassifyRequest(images=[IMAGE], model_version=version), timeout=30)
            assert answer.model_version == version
        assert stub.Classify(pb.ClassifyRequest(images=[IMAGE]), timeout=30).model_version == "2"  # the latest
        assert _code(lambda: stub.Classify(pb.ClassifyRequest(images=[IMAGE], model_version="3"), timeout=30)) == \
            grpc.StatusCode.NOT_FOUND
        listed = stub.ListModels(pb.ListModelsRequest(), timeout=10)
        assert sorted((m.name, m.version) for m in listed.models) == [("tiny-max", "1"), ("tiny-max", "2")]
        assert sorted((v.version, v.state) for v in listed.versions) == [("1", "READY"), ("2", "READY")]
        metadata = v2_grpc.GRPCInferenceServiceStub(channel).ModelMetadata(
            v2.ModelMetadataRequest(name="tiny-max"), timeout=10)
        assert list(metadata.versions) == ["1", "2"]
        with ClassifierClient(server.target) as client:  # the client library and the CLI show versions too
            assert client.model_info("tiny-max", version="1").version == "1"
            assert client.classify([random_images(1)[0]], version="1")[0].label
        bad = tmp_path / ".staging-bad"
        bad.mkdir()
        (bad / "model.pt").write_bytes(b"not a model")
        bad.rename(tmp_path / "tiny-max" / "3")  # a poll server would try it; this one lists it as it scans
    with ServerProcess(server_args(tmp_path, version_policy="all", model_control_mode="poll")) as server:
        assert cli_main(["--target", server.target, "models"]) == 0
        shown = capsys.readouterr().out
        assert "tiny-max       1" in shown and "tiny-max       2" in shown
        assert "not serving:" in shown and "UNAVAILABLE" in shown and "not a TorchScript archive" in shown


def test_a_file_whose_folders_disagree_with_its_metadata_is_refused_at_start(tmp_path):
    path = publish(tmp_path, "tiny-max", "1")
    metadata_only(path)  # were its code loaded, the refusal would say it is not loadable
    (tmp_path / "tiny-max" / "1").rename(tmp_path / "tiny-max" / "7")
    server = ServerProcess(server_args(tmp_path), wait=False)
    try:
        assert server.wait(120) != 0
        assert "cannot start" in server.log and "version '1'" in server.log and "Traceback" not in server.log
        assert "the folders 'tiny-max' version '7'" in server.log and "not a loadable" not in server.log
    finally:
        server.kill()


def metadata_only(path: Path) -> None:
    """Rewrites the artifact at ``path`` as its metadata alone: the format reads it, torch cannot load it."""
    with zipfile.ZipFile(path) as archive:
        members = [(info, archive.read(info)) for info in archive.infolist()
                   if info.filename.split("/")[1:] == [artifact.EXTRA_DIR, artifact.METADATA_FILE]]
    with zipfile.ZipFile(path, "w") as archive:
        for info, data in members:
            archive.writestr(info, data)


# ----------------------------------------------------------------------------- in process: policies, poll, metrics
# No child process to start, importing torch again: these servers run on an event loop of this process.
POLL_SECONDS = 0.2


def publish_corrupt(models_dir: Path, name: str, version: str) -> Path:
    """``name/version/model.pt`` that is not a model, published as ``publish`` does."""
    staging = models_dir / f".staging-{name}-{version}"
    staging.mkdir()
    (staging / "model.pt").write_bytes(b"not a model")
    staging.rename(models_dir / name / version)
    return models_dir / name / version / "model.pt"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """tiny-max versions 1, 2 and 3 and tiny-avg version 1, exported once: the tests copy them in."""
    models = tmp_path_factory.mktemp("exported")
    for version in ("1", "2", "3"):
        publish(models, "tiny-max", version, seed=int(version))
    publish(models, "tiny-avg", "1", pool="avg")
    return models


def copy_in(exported: Path, models_dir: Path, name: str, version: str) -> Path:
    """Publishes ``exported``'s ``name/version`` into ``models_dir`` as ``publish`` does: copied beside, renamed in."""
    staging = models_dir / f".staging-{name}-{version}"
    shutil.copytree(exported / name / version, staging)
    (models_dir / name).mkdir(exist_ok=True)
    staging.rename(models_dir / name / version)
    return models_dir / name / version / "model.pt"


@pytest.mark.parametrize("policy, ready", [("latest:2", {"2", "3"}), ("specific:1,3", {"1", "3"})])
def test_the_version_policy_chooses_the_versions_that_serve(exported, policy, ready):
    server = RunningServer(make_config(exported, version_policy=policy))
    try:
        with grpc.insecure_channel(server.target) as channel:
            index = _index(channel)
            assert {v for (name, v), (state, _) in index.items() if name == "tiny-max" and state == "READY"} == ready
            assert pb_grpc.ClassifierStub(channel).Classify(pb.ClassifyRequest(images=[IMAGE]), timeout=30) \
                .model_version == "3"  # a request naming none gets the highest that serves
    finally:
        server.stop(grace=1.0)


def test_poll_follows_only_the_models_load_models_names_and_unloads_a_removed_version(exported, tmp_path):
    copy_in(exported, tmp_path, "tiny-max", "1")
    copy_in(exported, tmp_path, "tiny-avg", "1")
    server = RunningServer(make_config(tmp_path, model_control_mode="poll", repository_poll_seconds=POLL_SECONDS,
                                       load_models="tiny-max", version_policy="all"))
    try:
        with grpc.insecure_channel(server.target) as channel:
            classify = pb_grpc.ClassifierStub(channel).Classify
            copy_in(exported, tmp_path, "tiny-max", "2")  # a model --load-models names follows the folder
            _wait(lambda: _index(channel).get(("tiny-max", "2"), ("",))[0] == "READY")
            time.sleep(2 * POLL_SECONDS)  # two rescans more: the model left out stays out
            assert _index(channel)[("tiny-avg", "")] == ("", "")
            assert _code(lambda: classify(pb.ClassifyRequest(model="tiny-avg", images=[IMAGE]), timeout=30)) == \
                grpc.StatusCode.NOT_FOUND

            shutil.rmtree(tmp_path / "tiny-max" / "1")
            _wait(lambda: _index(channel)[("tiny-max", "1")] == ("UNAVAILABLE", "removed from the repository"))
            assert _code(lambda: classify(pb.ClassifyRequest(images=[IMAGE], model_version="1"), timeout=30)) == \
                grpc.StatusCode.NOT_FOUND
            assert classify(pb.ClassifyRequest(images=[IMAGE]), timeout=30).model_version == "2"
    finally:
        server.stop(grace=1.0)


def test_explicit_mode_with_workers_is_refused(tmp_path):
    with pytest.raises(ValueError, match="explicit with workers > 1: a load or unload call reaches one worker"):
        make_config(tmp_path, model_control_mode="explicit", workers=2)


def test_explicit_a_corrupt_version_loaded_by_call_is_refused_and_loads_and_unloads_are_counted(exported, tmp_path):
    copy_in(exported, tmp_path, "tiny-max", "1")
    registry = CollectorRegistry()
    server = RunningServer(make_config(tmp_path, model_control_mode="explicit"), registry)

    def sample(name: str, **labels: str) -> float:
        return registry.get_sample_value(name, {"model": "tiny-max", **labels}) or 0.0

    try:
        with grpc.insecure_channel(server.target) as channel:
            stub = v2_grpc.GRPCInferenceServiceStub(channel)
            classify = pb_grpc.ClassifierStub(channel).Classify
            load = v2.RepositoryModelLoadRequest(model_name="tiny-max")
            assert sample("cifar10_model_load_duration_seconds_count") == 1  # the start's load

            bad = publish_corrupt(tmp_path, "tiny-max", "2")
            with pytest.raises(grpc.RpcError) as refused:
                stub.RepositoryModelLoad(load, timeout=60)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "version 2" in refused.value.details() and str(bad) in refused.value.details()
            assert classify(pb.ClassifyRequest(images=[IMAGE]), timeout=30).model_version == "1"  # serves on
            state, reason = _index(channel)[("tiny-max", "2")]
            assert state == "UNAVAILABLE" and str(bad) in reason
            assert sample("cifar10_model_loads_total", outcome="failed") == 1

            # The call reloaded version 1 too (a load call reloads what the policy picks): count from here.
            shutil.rmtree(bad.parent)
            unloaded, loaded = (sample("cifar10_model_loads_total", outcome=o) for o in ("unloaded", "loaded"))
            timed, seconds = (sample(f"cifar10_model_load_duration_seconds_{s}") for s in ("count", "sum"))
            stub.RepositoryModelUnload(v2.RepositoryModelUnloadRequest(model_name="tiny-max"), timeout=60)
            _wait(lambda: _index(channel)[("tiny-max", "1")] == ("UNAVAILABLE", "unloaded"))
            assert sample("cifar10_model_loads_total", outcome="unloaded") == unloaded + 1
            stub.RepositoryModelLoad(load, timeout=60)
            assert sample("cifar10_model_loads_total", outcome="loaded") == loaded + 1
            assert sample("cifar10_model_load_duration_seconds_count") == timed + 1
            assert sample("cifar10_model_load_duration_seconds_sum") > seconds
    finally:
        server.stop(grace=1.0)


# ----------------------------------------------------------------------------- tritonclient
def test_tritonclient_reads_the_index_statistics_and_configuration(triton_python, tmp_path):
    publish(tmp_path, "tiny-max", "1")
    publish(tmp_path, "tiny-avg", "1", pool="avg")
    with ServerProcess(server_args(tmp_path, model_control_mode="explicit", max_queue_delay_us=0)) as server:
        done = subprocess.run([str(triton_python), str(SCRIPT), server.target, "tiny-max", "tiny-avg"],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout)
    index = {(m["name"], m.get("version", "")): m.get("state", "") for m in out["index"]["models"]}
    assert index == {("tiny-avg", "1"): "READY", ("tiny-max", "1"): "READY"}
    assert {"model_repository", "statistics", "model_configuration"} <= set(out["metadata"]["extensions"])

    config = out["config"]["config"]
    assert config["name"] == "tiny-max" and int(config["max_batch_size"]) == 64
    inputs = {i["name"]: i for i in config["input"]}
    assert inputs["image"]["data_type"] == "TYPE_UINT8" and [int(d) for d in inputs["image"]["dims"]] == [3, 32, 32]
    assert inputs["image"]["optional"] and inputs["encoded_image"]["optional"]
    outputs = {o["name"]: [int(d) for d in o["dims"]] for o in config["output"]}
    assert outputs["probabilities"] == [10] and len(outputs) > 10  # and every layer
    assert "dynamic_batching" in config and config["instance_group"][0]["kind"] == "KIND_CPU"

    stats = out["statistics"]["model_stats"][0]
    assert int(stats["inference_count"]) == out["sent"] == 11
    executions = int(stats["execution_count"])
    per_size = {int(b["batch_size"]): int(b["compute_infer"]["count"]) for b in stats["batch_stats"]}
    assert sum(per_size.values()) == executions >= 1
    assert sum(size * count for size, count in per_size.items()) == out["sent"]
    inference = stats["inference_stats"]
    assert int(inference["success"]["count"]) == 4 and int(inference["queue"]["count"]) == 4
    assert int(inference["compute_infer"]["ns"]) > 0

    assert out["ready_after_unload"] is False and out["ready_after_load"] is True
    unloaded = {(m["name"], m.get("version", "")): m.get("state", "") for m in out["index_after_unload"]["models"]}
    assert unloaded[("tiny-avg", "1")] in ("UNLOADING", "UNAVAILABLE")
    assert out["unknown"] == "StatusCode.NOT_FOUND"
