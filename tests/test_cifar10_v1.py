"""The real server on an ephemeral port, over a real channel, through the client library."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cifar10_serving.client import ClassifierError
from cifar10_serving.protos.cifar10.v1 import classifier_pb2 as pb
from cifar10_serving.protos.cifar10.v1 import classifier_pb2_grpc as pb_grpc
from tests.helpers.images import encode, random_images
from tests.helpers.servers import RunningServer, make_config

MODELS = ["tiny-max", "tiny-avg"]


@pytest.fixture(scope="module")
def direct(tiny_models_dir):
    """The same artifacts loaded straight with torch.jit.load, to compare the service against."""
    return {name: torch.jit.load(str(tiny_models_dir / f"{name}.pt"), map_location="cpu").eval() for name in MODELS}


def _expected(module, images_hwc: np.ndarray):
    with torch.no_grad():
        return module(torch.from_numpy(images_hwc).permute(0, 3, 1, 2).contiguous()).numpy()


# ----------------------------------------------------------------------------- discovery
def test_health_is_serving_for_the_server_and_the_service(tiny_client):
    assert tiny_client.health() == "SERVING"
    assert tiny_client.health("cifar10.v1.Classifier") == "SERVING"
    with pytest.raises(ClassifierError) as info:
        tiny_client.health("no.such.Service")
    assert info.value.code == grpc.StatusCode.NOT_FOUND


def test_reflection_lists_the_services(tiny_server):
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    with grpc.insecure_channel(tiny_server.target) as channel:
        db = ProtoReflectionDescriptorDatabase(channel)
        services = set(db.get_services())
        assert {"cifar10.v1.Classifier", "grpc.health.v1.Health"} <= services
        assert db.FindFileContainingSymbol("cifar10.v1.Classifier").name.endswith("classifier.proto")


def test_list_models_and_model_info(tiny_client, tiny_models_dir):
    response = tiny_client.list_models()
    assert response.default_model == "tiny-max"
    assert sorted(m.name for m in response.models) == sorted(MODELS)
    default = tiny_client.model_info()
    assert default.name == "tiny-max" and default.is_default
    avg = tiny_client.model_info("tiny-avg")
    assert (avg.pooling.kind, avg.pooling.window, avg.pooling.stride, avg.pooling.padding) == ("avg", 3, 2, 0)
    assert list(avg.class_names)[3] == "cat" and list(avg.input.shape) == [3, 32, 32]
    meta = json.loads(avg.metadata_json)
    assert [(l.name, l.kind, list(l.output_shape)) for l in avg.layers] == [
        (row["name"], row["kind"], row["output_shape"]) for row in meta["layers"]]
    # pooling halves width and height and keeps depth: visible in the layer table
    shapes = {l.name: list(l.output_shape) for l in avg.layers}
    assert shapes["stage1.pool"] == [shapes["stage1.conv1"][0], 15, 15]
    assert avg.device == "cpu" and avg.flops_per_image > 0


# ----------------------------------------------------------------------------- classify
@pytest.mark.parametrize("model", MODELS)
def test_scores_match_the_model_called_directly(tiny_client, direct, model):
    images = random_images(5, seed=1)
    expected = _expected(direct[model], images)
    raw = tiny_client.classify(list(images), model=model, top_k=3)
    png = tiny_client.classify([encode(img) for img in images], model=model, top_k=3)
    for got_raw, got_png, want in zip(raw, png, expected):
        np.testing.assert_allclose(got_raw.probabilities, want, atol=1e-6)
        np.testing.assert_allclose(got_png.probabilities, want, atol=1e-6)  # PNG is lossless
        assert got_raw.probabilities.sum() == pytest.approx(1.0, abs=1e-5)
        assert [p.index for p in got_raw.top_k] == list(np.argsort(-want, kind="stable")[:3])
        assert got_raw.top_k[0].probability >= got_raw.top_k[1].probability >= got_raw.top_k[2].probability


def test_the_two_pooling_variants_answer_differently(tiny_client):
    images = list(random_images(2, seed=2))
    a = tiny_client.classify(images, model="tiny-max")[0].probabilities
    b = tiny_client.classify(images, model="tiny-avg")[0].probabilities
    assert not np.allclose(a, b)


def test_float32_raw_and_jpeg_inputs(tiny_client, direct):
    images = random_images(2, seed=3)
    as_float = tiny_client.classify([img.astype(np.float32) / 255.0 for img in images])
    np.testing.assert_allclose(as_float[0].probabilities, _expected(direct["tiny-max"], images)[0], atol=1e-6)
    jpeg = tiny_client.classify([encode(img, "JPEG", quality=90) for img in images])
    assert len(jpeg) == 2 and jpeg[0].probabilities.sum() == pytest.approx(1.0, abs=1e-5)


def test_larger_images_are_resized_and_centre_cropped(tiny_client, direct):
    small = random_images(1, seed=4)[0]
    big = np.kron(small, np.ones((2, 2, 1), dtype=np.uint8))  # each pixel as a 2x2 block: 64x64
    wide = np.pad(big, ((0, 0), (16, 16), (0, 0)), mode="edge")  # 96x64; its centre crop is the big one
    want = _expected(direct["tiny-max"], small[None])[0]
    got_big, got_wide = (r.probabilities for r in tiny_client.classify([encode(big), encode(wide)]))
    np.testing.assert_allclose(got_wide, got_big, atol=1e-5)  # the crop is the centre
    np.testing.assert_allclose(got_big, want, atol=2e-4)  # bilinear 2x reduction ~ the original pixels


@pytest.mark.parametrize("model", MODELS)
def test_feature_maps_equal_the_models_activations(tiny_client, direct, model):
    images = random_images(2, seed=5)
    info = tiny_client.model_info(model)
    results = tiny_client.classify(list(images), model=model, layers=["*"])
    x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    with torch.no_grad():
        _, feats = direct[model].forward_with_features(x, [l.name for l in info.layers])
    for i, result in enumerate(results):
        assert list(result.feature_maps) == [l.name for l in info.layers]
        for layer in info.layers:
            fmap = result.feature_maps[layer.name]
            assert fmap.shape == tuple(layer.output_shape) and fmap.dtype == np.float32
            np.testing.assert_allclose(fmap, feats[layer.name][i].numpy(), atol=1e-5)
    half = tiny_client.classify(list(images[:1]), model=model, layers=["stage2.pool"], feature_dtype="float16")[0]
    assert half.feature_maps["stage2.pool"].dtype == np.float16
    np.testing.assert_allclose(half.feature_maps["stage2.pool"], feats["stage2.pool"][0].numpy(), rtol=2e-3, atol=2e-3)


def test_64_concurrent_callers_get_their_own_answers(tiny_client, direct):
    images = random_images(64, seed=6)
    expected = _expected(direct["tiny-max"], images)
    barrier = threading.Barrier(64)

    def call(i):
        barrier.wait()
        return tiny_client.classify([images[i]])[0].probabilities

    with ThreadPoolExecutor(64) as pool:
        answers = list(pool.map(call, range(64)))
    for got, want in zip(answers, expected):
        np.testing.assert_allclose(got, want, atol=1e-6)
    assert len({a.tobytes() for a in answers}) == 64


def test_stream_answers_in_order_and_survives_a_bad_request(tiny_client, direct):
    images = random_images(4, seed=7)
    batches = [[images[0]], [images[1], images[2]], [b"garbage"], [images[3]]]
    answers = list(tiny_client.classify_stream(batches))
    assert [a.request_id for a in answers] == sorted((a.request_id for a in answers), key=int)
    assert [a.error is None for a in answers] == [True, True, False, True]
    assert answers[2].error.code == grpc.StatusCode.INVALID_ARGUMENT and "image 0" in answers[2].error.details
    expected = _expected(direct["tiny-max"], images)
    got = [r.probabilities for a in answers for r in a.results]
    np.testing.assert_allclose(np.stack(got), expected, atol=1e-6)


# ----------------------------------------------------------------------------- errors
# Every bad Classify request, with its status and message, is in tests/test_hostile.py's one table.
GOOD = pb.Image(raw=pb.RawTensor(shape=[32, 32, 3], dtype=pb.DTYPE_UINT8, layout=pb.LAYOUT_HWC,
                                 data=random_images(1, seed=8)[0].tobytes()))


def test_unknown_model_info_is_not_found(tiny_client):
    with pytest.raises(ClassifierError) as info:
        tiny_client.model_info("nope")
    assert info.value.code == grpc.StatusCode.NOT_FOUND and "tiny-avg" in info.value.details


# ----------------------------------------------------------------------------- lifecycle
def test_shutdown_turns_health_not_serving_then_refuses_calls(tiny_models_dir):
    running = RunningServer(make_config(tiny_models_dir))
    seen = []
    with grpc.insecure_channel(running.target) as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""), timeout=30)
        seen.append(next(watch).status)

        def follow():
            try:
                for update in watch:
                    seen.append(update.status)
            except grpc.RpcError:
                pass

        follower = threading.Thread(target=follow)
        follower.start()
        running.stop(grace=2.0)
        follower.join(10)
        with pytest.raises(grpc.RpcError) as info:
            pb_grpc.ClassifierStub(channel).Classify(pb.ClassifyRequest(images=[GOOD]), timeout=5)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert seen[0] == health_pb2.HealthCheckResponse.SERVING
    assert health_pb2.HealthCheckResponse.NOT_SERVING in seen[1:]


def test_metrics_endpoint_serves_prometheus_text(tiny_server, tiny_client):
    tiny_client.classify([random_images(1)[0]])
    body = urllib.request.urlopen(f"http://127.0.0.1:{tiny_server.app.metrics_port}/metrics", timeout=10).read().decode()
    assert 'cifar10_request_duration_seconds_bucket{code="OK",le="+Inf",method="Classify",model="tiny-max"}' in body
    assert "process_resident_memory_bytes" in body


def test_client_import_does_not_import_torch():
    code = ("import sys, cifar10_serving.client, cifar10_serving.client.cli, cifar10_serving.client.featuremaps; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
