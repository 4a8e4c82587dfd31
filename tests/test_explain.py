"""Explain, against a real server: the maps are the gradients of the same TorchScript file, errors have
their codes, the metrics count the method, and a busy explanation path leaves Classify alone."""

from __future__ import annotations

import asyncio
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry
from torch.nn import functional as F

from cifar10_serving.client import ClassifierClient, ClassifierError
from cifar10_serving.protos.cifar10.v1 import classifier_pb2 as pb
from cifar10_serving.protos.cifar10.v1 import classifier_pb2_grpc as pb_grpc
from cifar10_serving.server.cifar10_v1 import V1Servicer
from cifar10_serving.server.core import ServingCore
from cifar10_serving.server.explain import Explainer
from cifar10_serving.server.metrics import Metrics
from tests.helpers.images import random_images
from tests.helpers.servers import make_config

LAST_STAGE = "stage3.act2"  # the tiny models' last layer with an H x W map


def direct_gradients(path, images: np.ndarray, layer: str, target: int | None = None):
    """Saliency and Grad-CAM straight from the file: its own load, its own backward pass, per image."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = torch.jit.load(str(path)).eval()
    saliency, cams, classes = [], [], []
    for image in images:  # one image at a time: nothing shared with the server's batched pass
        x = torch.from_numpy(image.transpose(2, 0, 1).copy())[None].float().requires_grad_(True)
        with torch.jit.optimized_execution(False):  # else the feature outputs lose their gradient
            probabilities, features = module.forward_with_features(x, [layer, "classifier.fc"])
        k = int(probabilities.argmax()) if target is None else target
        activation = features[layer]
        d_x, d_a = torch.autograd.grad(features["classifier.fc"][0, k], [x, activation])
        saliency.append(d_x[0].abs().amax(dim=0).numpy())
        weights = d_a[0].mean(dim=(1, 2)).numpy()  # one weight per channel
        cam = np.maximum((weights[:, None, None] * activation[0].detach().numpy()).sum(axis=0), 0)
        cams.append(F.interpolate(torch.from_numpy(cam)[None, None], size=(32, 32), mode="bilinear",
                                  align_corners=False)[0, 0].numpy())
        classes.append(k)
    return np.stack(saliency), np.stack(cams), classes


def test_maps_are_the_gradients_of_the_same_file(tiny_client, tiny_models_dir):
    images = random_images(3, seed=5)
    answers = tiny_client.explain(list(images), model="tiny-avg")
    saliency, cams, classes = direct_gradients(tiny_models_dir / "tiny-avg.pt", images, LAST_STAGE)
    top = [c.top_k[0].index for c in tiny_client.classify(list(images), model="tiny-avg")]
    assert [a.index for a in answers] == classes == top  # default: each image's top class
    for answer, s, g in zip(answers, saliency, cams):
        assert [m.method for m in answer.maps] == ["saliency", "grad_cam"]
        assert answer.map("saliency").layer == "input" and answer.map("grad_cam").layer == LAST_STAGE
        assert answer.map("saliency").values.shape == answer.map("grad_cam").values.shape == (32, 32)
        assert s.max() > 0 and g.max() > 0  # a map of zeros would agree with anything
        np.testing.assert_allclose(answer.map("saliency").values, s, rtol=1e-3, atol=1e-6 * s.max())
        np.testing.assert_allclose(answer.map("grad_cam").values, g, rtol=1e-3, atol=1e-4 * g.max())


def test_chosen_class_and_layer(tiny_client, tiny_models_dir):
    image = random_images(1, seed=9)
    answer = tiny_client.explain(list(image), target=7, layer="stage2.pool")[0]
    saliency, cams, _ = direct_gradients(tiny_models_dir / "tiny-max.pt", image, "stage2.pool", target=7)
    assert (answer.index, answer.label) == (7, "horse")
    probability = tiny_client.classify(list(image))[0].probabilities[7]
    assert answer.probability == pytest.approx(float(probability), rel=1e-4)
    assert answer.map("grad_cam").layer == "stage2.pool"
    np.testing.assert_allclose(answer.map("saliency").values, saliency[0], rtol=1e-3, atol=1e-6 * saliency.max())
    np.testing.assert_allclose(answer.map("grad_cam").values, cams[0], rtol=1e-3, atol=1e-4 * max(cams.max(), 1e-6))


@pytest.mark.parametrize("options, code, words", [
    ({"layer": "stage9.conv1"}, grpc.StatusCode.INVALID_ARGUMENT, "has no layer 'stage9.conv1'"),
    ({"layer": "head.pool"}, grpc.StatusCode.INVALID_ARGUMENT, "has no H x W map at 'head.pool'"),
    ({"target": 10}, grpc.StatusCode.INVALID_ARGUMENT, "classes 0 to 9"),
    ({"model": "nope"}, grpc.StatusCode.NOT_FOUND, "'nope' is not loaded"),
    ({"images": 9}, grpc.StatusCode.INVALID_ARGUMENT, "send 1 to 8"),
    ({"images": b"not a png"}, grpc.StatusCode.INVALID_ARGUMENT, "image 0: not a PNG or JPEG"),
])
def test_bad_requests_have_their_code_and_the_server_goes_on(tiny_client, options, code, words):
    images = options.pop("images", 1)
    images = [images] if isinstance(images, bytes) else list(random_images(images))
    with pytest.raises(ClassifierError) as caught:
        tiny_client.explain(images, **options)
    assert caught.value.code == code and words in caught.value.details
    assert tiny_client.explain(list(random_images(1)))[0].maps  # the next one is answered
    assert tiny_client.classify(list(random_images(1)))[0].label


def test_metrics_count_explain_under_its_own_method(tiny_server, tiny_client):
    registry = tiny_server.app.metrics.registry

    def count(code: str) -> float:
        labels = {"method": "Explain", "model": "tiny-max", "code": code}
        return registry.get_sample_value("cifar10_requests_total", labels) or 0.0

    ok, bad = count("OK"), count("INVALID_ARGUMENT")
    classified = registry.get_sample_value("cifar10_images_total", {"model": "tiny-max", "outcome": "ok"}) or 0.0
    tiny_client.explain(list(random_images(2)))
    with pytest.raises(ClassifierError):
        tiny_client.explain(list(random_images(1)), target=99)
    assert (count("OK"), count("INVALID_ARGUMENT")) == (ok + 1, bad + 1)
    # Explained images are not classified images: that counter stays Classify's.
    assert (registry.get_sample_value("cifar10_images_total", {"model": "tiny-max", "outcome": "ok"}) or 0.0) == classified


class Served:
    """A Classifier service on a real port with an explanation path of one slot, whose one thread the
    test can hold: the core and front-end as create_server builds them, with the explainer's limits
    and thread as arguments."""

    def __init__(self, models_dir) -> None:
        self.config = make_config(models_dir)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.run(self._start())

    def run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(60)

    async def _start(self) -> None:
        self.metrics = Metrics(CollectorRegistry())
        self.thread_pool = ThreadPoolExecutor(1)
        self.explainer = Explainer(threads=1, max_waiting=0, executor=self.thread_pool)
        self.core = ServingCore(self.config, self.metrics, device=torch.device("cpu"), threads=1,
                                instances=1, explainer=self.explainer)
        await self.core.start()
        self.server = grpc.aio.server()
        pb_grpc.add_ClassifierServicer_to_server(V1Servicer(self.core), self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()

    def hold(self) -> threading.Event:
        """Occupies the explanation thread until the returned event is set."""
        release = threading.Event()
        self.thread_pool.submit(release.wait, 30)
        return release

    def stop(self) -> None:
        async def stop():
            await self.server.stop(1.0)
            await self.core.stop()
        self.run(stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def test_a_busy_explanation_path_refuses_at_once_and_classify_is_untouched(tiny_models_dir):
    served = Served(tiny_models_dir)
    try:
        with ClassifierClient(f"127.0.0.1:{served.port}", timeout=30) as client:
            client.explain(list(random_images(1)))  # loads the explainable copy before the clock starts
            release = served.hold()
            stub = pb_grpc.ClassifierStub(client._channels[0])
            request = pb.ExplainRequest(images=[pb.Image(raw=pb.RawTensor(
                shape=[32, 32, 3], layout=pb.LAYOUT_HWC, data=random_images(1)[0].tobytes()))])
            waiting = stub.Explain.future(request, timeout=30)  # takes the one slot, queued behind the hold
            deadline = time.monotonic() + 10
            while served.explainer.in_use < 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            with pytest.raises(ClassifierError) as busy:
                client.explain(list(random_images(1)))
            assert busy.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "retry later" in busy.value.details
            start = time.monotonic()
            for _ in range(5):  # classification does not wait for the explanation path
                assert client.classify(list(random_images(4)), timeout=10)[0].label
            assert time.monotonic() - start < 10
            assert not waiting.done()
            release.set()
            assert len(waiting.result(30).explanations) == 1  # and the queued one is answered after
    finally:
        served.stop()
