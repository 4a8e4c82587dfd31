"""NVIDIA's real ``tritonclient`` against a real server: health, metadata, raw UINT8 and BYTES
inference, top-k through the classification extension, a feature map of the metadata's shape, and
errors as InferenceServerException with their status codes; saliency and Grad-CAM equal to cifar10.v1
Explain's; over gRPC (``tritonclient.grpc``) and over HTTP (``tritonclient.http``, binary and JSON
tensors, with statistics, configuration and the repository's index, load and unload).

tritonclient pins protobuf<7 and this project needs >=7, so it lives in a venv of its own, as a real
user's would (the ``triton_python`` fixture, tests/helpers/tritonclient_venv.py).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from cifar10_serving.client import ClassifierClient
from cifar10_serving.server.launcher import ServerProcess
from tests.helpers.images import encode, random_images
from tests.helpers.servers import server_args

pytestmark = pytest.mark.system  # a server process, and tritonclient in a venv of its own

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = Path(__file__).resolve().parent / "helpers" / "tritonclient_calls.py"
CALLS_TIMEOUT_SECONDS = 180


@pytest.fixture(scope="module")
def running(tiny_models_dir):
    """The server as its own process, as a Triton user would find it."""
    with ServerProcess(server_args(tiny_models_dir, metrics_port=-1, model_control_mode="explicit")) as server:
        yield server


def test_tritonclient_drives_the_v2_api(triton_python, running, tmp_path):
    images = random_images(3, seed=51)
    np.save(tmp_path / "images.npy", np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
    files = [encode(img) for img in images]
    for i, data in enumerate(files):
        (tmp_path / f"{i}.png").write_bytes(data)
    done = subprocess.run([str(triton_python), str(SCRIPT), running.target, str(tmp_path),
                           f"127.0.0.1:{running.http_port}"],
                          capture_output=True, text=True, timeout=CALLS_TIMEOUT_SECONDS)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads((tmp_path / "answers.json").read_text())

    with ClassifierClient(running.target, timeout=30) as own:
        info = own.model_info("tiny-max")
        scores = np.stack([r.probabilities for r in own.classify(list(images))])
        expected = own.classify(list(images), top_k=3, layers=["stage2.pool"])  # another graph: scores may differ by an ulp
        explained = own.explain(list(images))
        explained_7 = own.explain(list(images), target=7, layer="stage2.pool")

    assert (got["live"], got["ready"], got["model_ready"]) == (True, True, True)
    assert got["server"]["name"] == "cifar10-serving" and "classification" in got["server"]["extensions"]
    meta = got["metadata"]
    assert meta["name"] == "tiny-max" and meta["versions"] == [info.version] and meta["platform"] == "pytorch_torchscript"
    assert [(t["name"], t["datatype"], [int(d) for d in t["shape"]]) for t in meta["inputs"]] == [
        ("image", "UINT8", [-1, 3, 32, 32]), ("encoded_image", "BYTES", [-1, 1])]
    shapes = {t["name"]: [int(d) for d in t["shape"]] for t in meta["outputs"]}  # int64 arrive as JSON strings
    assert list(shapes) == ["probabilities", *(layer.name for layer in info.layers), "saliency", "grad_cam"]

    np.testing.assert_array_equal(np.array(got["raw"], dtype=np.float32), scores)
    assert got["raw_id"] == "raw-1"
    for row, result in zip(got["top3"], expected):
        parsed = [s.split(":") for s in row]
        assert [(int(i), label) for _, i, label in parsed] == [(p.index, p.label) for p in result.top_k]
        np.testing.assert_allclose([float(s) for s, _, _ in parsed], [p.probability for p in result.top_k], rtol=1e-6)
    assert got["fmap_shape"] == [3, *shapes["stage2.pool"][1:]]
    want = np.stack([r.feature_maps["stage2.pool"] for r in expected])
    np.testing.assert_allclose(np.array(got["fmap"]).reshape(want.shape), want, atol=1e-6)

    _assert_maps(got["saliency"], got["grad_cam"], explained)
    assert got["grad_cam_layer"] == "stage3.act2"  # the default: the last stage's output

    status, message = got["errors"]["bad_shape"]
    assert status == "StatusCode.INVALID_ARGUMENT" and "input 'image'" in message
    status, message = got["errors"]["unknown_model"]
    assert status == "StatusCode.NOT_FOUND" and "resnet-9000" in message
    np.testing.assert_array_equal(np.array(got["after"], dtype=np.float32), scores)

    http = json.loads((tmp_path / "http_answers.json").read_text())
    assert (http["live"], http["ready"], http["model_ready"]) == (True, True, True)
    assert http["server"]["extensions"] == [
        "classification", "binary_tensor_data", "model_configuration", "statistics", "model_repository"]
    assert http["metadata"]["inputs"][0] == {"name": "image", "datatype": "UINT8", "shape": [-1, 3, 32, 32]}
    for form in ("binary", "json", "after"):
        np.testing.assert_array_equal(np.array(http[form], dtype=np.float32), scores, err_msg=form)
    assert http["binary_id"] == "http-1"
    np.testing.assert_allclose(np.array(http["encoded"], dtype=np.float32), np.array(got["raw"], dtype=np.float32),
                               atol=1e-6)  # PNG is lossless: the same pixels
    # gRPC's top-3 came from a pass with a feature map: another graph, whose scores may differ by an ulp
    assert [[s.split(":")[1:] for s in row] for row in http["top3"]] == [[s.split(":")[1:] for s in row] for row in got["top3"]]
    status, message = http["errors"]["bad_shape"]
    assert status == "400" and "input 'image'" in message
    status, message = http["errors"]["unknown_model"]
    assert status == "404" and "resnet-9000" in message

    _assert_maps(http["saliency_7"], http["grad_cam_7"], explained_7)
    parameters = http["grad_cam_7_parameters"]
    assert (parameters["class_index"], parameters["class_indices"], parameters["layer"]) == (7, "7,7,7", "stage2.pool")

    (stats,) = http["statistics"]["model_stats"]
    assert (stats["name"], stats["version"]) == ("tiny-max", info.version)
    assert stats["inference_count"] >= 5 * len(images)  # at least what the HTTP calls above classified
    assert sum(b["compute_infer"]["count"] for b in stats["batch_stats"]) == stats["execution_count"]
    assert {s["name"] for s in http["all_statistics"]["model_stats"]} == {"tiny-max", "tiny-avg"}
    config = http["config"]
    assert config["name"] == "tiny-max" and config["max_batch_size"] == 64
    assert [(i["name"], i["data_type"]) for i in config["input"]] == [("image", "TYPE_UINT8"),
                                                                      ("encoded_image", "TYPE_STRING")]
    assert [o["name"] for o in config["output"]] == list(shapes)
    index = {(m["name"], m.get("version", "")): m.get("state") for m in http["index"]}
    assert index == {("tiny-avg", info.version): "READY", ("tiny-max", info.version): "READY"}
    assert (http["ready_after_unload"], http["ready_after_load"]) == (False, True)
    after = {(m["name"], m.get("version", "")): m.get("state") for m in http["index_after_unload"]}
    assert after[("tiny-avg", info.version)] in ("UNLOADING", "UNAVAILABLE")
    status, message = http["errors"]["unknown_load"]
    assert status == "404" and "'no-such-model' is not in the repository" in message


def _assert_maps(saliency, grad_cam, reference) -> None:
    """Maps from tritonclient equal to cifar10.v1 Explain's for the same images."""
    for s, g, answer in zip(np.array(saliency, dtype=np.float32), np.array(grad_cam, dtype=np.float32), reference):
        want_s, want_g = answer.map("saliency").values, answer.map("grad_cam").values
        assert want_s.max() > 0 and want_g.max() > 0
        np.testing.assert_allclose(s, want_s, rtol=1e-5, atol=1e-6 * want_s.max())
        np.testing.assert_allclose(g, want_g, rtol=1e-5, atol=1e-6 * want_g.max())
