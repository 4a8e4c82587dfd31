"""SERVING fast, then warm (issue 30): the server says SERVING once its default model can answer,
the other models report ready one by one as they warm, a model that is not warm yet is refused
UNAVAILABLE (a retry goes through once it is), and a call that meets a batch size not yet warmed is
answered all the same, with the same numbers as the file itself gives."""

from __future__ import annotations

import asyncio
import threading
import warnings

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cifar10_serving.protos.cifar10.v1 import classifier_pb2 as pb
from cifar10_serving.protos.cifar10.v1 import classifier_pb2_grpc as pb_grpc
from cifar10_serving.protos.inference import open_inference_grpc_pb2 as v2
from cifar10_serving.protos.inference import open_inference_grpc_pb2_grpc as v2_grpc
from tests.helpers.images import random_images
from tests.helpers.servers import make_config

# Warm-up rounds: enough that the second model is still warming when the test looks (a second or
# more on any CPU), few enough for a short test.
SLOW_WARM_UP = 300


@pytest.fixture()
def just_serving(tiny_models_dir):
    """A server the moment ``create_server`` returns (SERVING), not waiting for every model."""
    from cifar10_serving.server.main import create_server

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    def run(coro, timeout=120):
        return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout)

    app = run(create_server(make_config(tiny_models_dir, warmup_batches=SLOW_WARM_UP)))
    try:
        yield app, run
    finally:
        run(app.stop(1.0))
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


def _raw(images: np.ndarray) -> list[pb.Image]:
    return [pb.Image(raw=pb.RawTensor(shape=[32, 32, 3], layout=pb.LAYOUT_HWC, data=a.tobytes())) for a in images]


def test_serving_comes_with_the_default_model_and_the_others_follow(just_serving, tiny_models_dir):
    app, run = just_serving
    with grpc.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        v2_stub, stub = v2_grpc.GRPCInferenceServiceStub(channel), pb_grpc.ClassifierStub(channel)
        assert v2_stub.ServerReady(v2.ServerReadyRequest(), timeout=10).ready
        assert v2_stub.ModelReady(v2.ModelReadyRequest(name="tiny-max"), timeout=10).ready
        assert not v2_stub.ModelReady(v2.ModelReadyRequest(name="tiny-avg"), timeout=10).ready
        with pytest.raises(grpc.RpcError) as info:
            stub.Classify(pb.ClassifyRequest(model="tiny-avg", images=_raw(random_images(1))), timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE and "loading" in info.value.details()
        states = {(v.name, v.state) for v in stub.ListModels(pb.ListModelsRequest(), timeout=10).versions}
        assert ("tiny-max", "READY") in states and ("tiny-avg", "LOADING") in states

        # A batch of 13 with every feature map: a rung and maps no warm-up has made yet, answered right.
        images = random_images(13, seed=7)
        answer = stub.Classify(pb.ClassifyRequest(images=_raw(images), feature_layers=["*"]), timeout=60)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = torch.jit.load(str(tiny_models_dir / "tiny-max.pt")).eval()
        with torch.no_grad():
            expected = module(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).numpy()
        got = np.array([r.probabilities for r in answer.results])
        np.testing.assert_allclose(got, expected, atol=1e-5)
        assert len(answer.results[0].feature_maps) > 10

        run(app.all_ready())
        assert v2_stub.ModelReady(v2.ModelReadyRequest(name="tiny-avg"), timeout=10).ready
        assert stub.Classify(pb.ClassifyRequest(model="tiny-avg", images=_raw(random_images(1))), timeout=10).results
