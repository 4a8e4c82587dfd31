"""Explanations through the Open Inference Protocol, against real servers: the outputs ``saliency`` and
``grad_cam`` of ModelInfer (gRPC) and of ``/infer`` (HTTP) are cifar10.v1 Explain's maps for the same
images, with the class and layer as parameters; bad asks have their codes; and ModelInfer without them
keeps its latency while the explanation path is saturated."""

from __future__ import annotations

import asyncio
import http.client
import json
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry

from cifar10_serving.protos.inference import open_inference_grpc_pb2 as v2
from cifar10_serving.protos.inference import open_inference_grpc_pb2_grpc as v2_grpc
from cifar10_serving.server import registration
from cifar10_serving.server.core import ServingCore
from cifar10_serving.server.explain import Explainer
from cifar10_serving.server.health import DrainingHealthServicer
from cifar10_serving.server.metrics import Metrics
from cifar10_serving.server.open_inference import OpenInferenceServicer
from tests.helpers.images import encode, random_images
from tests.helpers.servers import make_config
from tests.test_open_inference import Output, files_request, image_request, outputs_of

LAST_STAGE = "stage3.act2"  # the tiny models' default Grad-CAM layer (tests/test_explain.py)


def explain_outputs(class_index: int | None = None, layer: str = "") -> list[Output]:
    saliency, grad_cam = Output(name="saliency"), Output(name="grad_cam")
    if class_index is not None:
        saliency.parameters["class_index"].int64_param = class_index
    if layer:
        grad_cam.parameters["layer"].string_param = layer
    return [saliency, grad_cam]


def params_of(tensor) -> dict:
    return {k: getattr(p, p.WhichOneof("parameter_choice")) for k, p in tensor.parameters.items()}


def assert_maps_equal(got_saliency, got_cam, reference) -> None:
    for s, g, answer in zip(got_saliency, got_cam, reference):
        want_s, want_g = answer.map("saliency").values, answer.map("grad_cam").values
        assert want_s.max() > 0 and want_g.max() > 0  # maps of zeros would agree with anything
        np.testing.assert_allclose(s, want_s, rtol=1e-5, atol=1e-6 * want_s.max())
        np.testing.assert_allclose(g, want_g, rtol=1e-5, atol=1e-6 * want_g.max())


@pytest.fixture()
def stub(tiny_server):
    with grpc.insecure_channel(tiny_server.target) as channel:
        yield v2_grpc.GRPCInferenceServiceStub(channel)


# ----------------------------------------------------------------------------- gRPC
@pytest.mark.parametrize("raw", [True, False], ids=["raw", "typed"])
def test_grpc_maps_equal_cifar10_v1_explain(stub, tiny_client, raw):
    images = random_images(3, seed=61)
    reference = tiny_client.explain(list(images), model="tiny-avg")
    response = stub.ModelInfer(image_request(images, model="tiny-avg", raw=raw, outputs=explain_outputs()), timeout=30)
    assert [(t.name, t.datatype, list(t.shape)) for t in response.outputs] == [
        ("saliency", "FP32", [3, 32, 32]), ("grad_cam", "FP32", [3, 32, 32])]
    got = outputs_of(response)
    assert_maps_equal(got["saliency"], got["grad_cam"], reference)
    classes = [a.index for a in reference]
    saliency, grad_cam = (params_of(t) for t in response.outputs)
    assert saliency["class_indices"] == grad_cam["class_indices"] == ",".join(map(str, classes))
    assert (saliency["layer"], grad_cam["layer"]) == ("input", LAST_STAGE)
    if len(set(classes)) == 1:
        assert saliency["class_index"] == classes[0]


def test_grpc_class_and_layer_as_output_or_request_parameters(stub, tiny_client):
    images = random_images(2, seed=62)
    reference = tiny_client.explain(list(images), target=7, layer="stage2.pool")
    by_output = stub.ModelInfer(image_request(images, outputs=explain_outputs(7, "stage2.pool")), timeout=30)
    by_request = image_request(images, outputs=explain_outputs())
    by_request.parameters["class_index"].int64_param = 7  # what tritonclient's infer(parameters=...) sends
    by_request.parameters["layer"].string_param = "stage2.pool"
    by_request = stub.ModelInfer(by_request, timeout=30)
    for response in (by_output, by_request):
        got = outputs_of(response)
        assert_maps_equal(got["saliency"], got["grad_cam"], reference)
        assert params_of(response.outputs[1]) == {"class_index": 7, "class_indices": "7,7", "layer": "stage2.pool"}


def test_grpc_encoded_images_equal_cifar10_v1_explain(stub, tiny_client):
    images = random_images(2, seed=63)
    files = [encode(images[0]), encode(np.kron(images[1], np.ones((2, 2, 1), dtype=np.uint8)))]  # 64x64: cropped
    reference = tiny_client.explain(files)
    got = outputs_of(stub.ModelInfer(files_request(files, outputs=explain_outputs()[1:]), timeout=30))
    assert list(got) == ["grad_cam"]
    for g, answer in zip(got["grad_cam"], reference):
        np.testing.assert_allclose(g, answer.map("grad_cam").values, rtol=1e-5, atol=1e-6)


def test_grpc_explanations_and_inference_outputs_in_one_request_answer_in_the_order_asked(stub, tiny_client):
    # perf_analyzer asks for every output ModelMetadata lists: both paths answer one request.
    images = random_images(2, seed=64)
    reference = tiny_client.explain(list(images))
    answer = stub.ModelInfer(image_request(images, outputs=[Output(name="grad_cam"), Output(name="probabilities"),
                                                            Output(name="stage1.pool"), Output(name="saliency")]),
                             timeout=60)
    assert [o.name for o in answer.outputs] == ["grad_cam", "probabilities", "stage1.pool", "saliency"]
    got = outputs_of(answer)
    plain = outputs_of(stub.ModelInfer(image_request(images), timeout=30))
    np.testing.assert_allclose(got["probabilities"], plain["probabilities"], rtol=1e-6)
    for g, s, expected in zip(got["grad_cam"], got["saliency"], reference):
        np.testing.assert_allclose(g, expected.map("grad_cam").values, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(s, expected.map("saliency").values, rtol=1e-5, atol=1e-6)


def _bad(**params) -> list[Output]:
    out = Output(name=params.pop("name", "saliency"))
    for key, value in params.items():
        setattr(out.parameters[key], {int: "int64_param", str: "string_param"}[type(value)], value)
    return [out]


BAD = {
    "class out of range": (lambda: image_request(random_images(1), outputs=_bad(class_index=10)),
                           grpc.StatusCode.INVALID_ARGUMENT, "'class_index' is 10"),
    "layer on saliency": (lambda: image_request(random_images(1), outputs=_bad(layer="stage2.pool")),
                          grpc.StatusCode.INVALID_ARGUMENT, "applies to 'grad_cam' only"),
    "unknown layer": (lambda: image_request(random_images(1), outputs=_bad(name="grad_cam", layer="stage9.conv1")),
                      grpc.StatusCode.INVALID_ARGUMENT, "has no layer 'stage9.conv1'"),
    "layer without a map": (lambda: image_request(random_images(1), outputs=_bad(name="grad_cam", layer="head.pool")),
                            grpc.StatusCode.INVALID_ARGUMENT, "no H x W map"),
    "two classes": (lambda: image_request(random_images(1), outputs=_bad(class_index=1) + _bad(name="grad_cam",
                                                                                               class_index=2)),
                    grpc.StatusCode.INVALID_ARGUMENT, "one backward pass"),
    "nine images": (lambda: image_request(random_images(9), outputs=_bad()), grpc.StatusCode.INVALID_ARGUMENT,
                    "send 1 to 8"),
    "request class without an explanation": (lambda: _with_request_parameter(image_request(random_images(1))),
                                             grpc.StatusCode.INVALID_ARGUMENT, "applies to the outputs 'saliency'"),
    "FP16 explanation": (lambda: image_request(random_images(1), outputs=_bad(datatype="FP16")),
                         grpc.StatusCode.INVALID_ARGUMENT, "'datatype' not offered"),
}


def _with_request_parameter(request: v2.ModelInferRequest) -> v2.ModelInferRequest:
    request.parameters["class_index"].int64_param = 3
    return request


@pytest.mark.parametrize("case", list(BAD))
def test_bad_explanation_requests_have_their_code_and_the_server_goes_on(stub, case):
    make, code, words = BAD[case]
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(make(), timeout=30)
    assert info.value.code() == code and words in info.value.details(), info.value.details()
    assert stub.ModelInfer(image_request(random_images(1), outputs=explain_outputs()), timeout=30).outputs


# ----------------------------------------------------------------------------- HTTP
def http_infer(server, body: bytes | str, headers: dict | None = None) -> tuple[int, dict, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", server.app.http_port, timeout=30)
    try:
        connection.request("POST", "/v2/models/tiny-max/infer", body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


def test_http_json_and_binary_maps_equal_cifar10_v1_explain(tiny_server, tiny_client):
    images = random_images(2, seed=64)
    chw = np.ascontiguousarray(images.transpose(0, 3, 1, 2))
    reference = tiny_client.explain(list(images), target=2)
    outputs = [{"name": "saliency", "parameters": {"class_index": 2}}, {"name": "grad_cam"}]
    status, _, body = http_infer(tiny_server, json.dumps({"inputs": [{"name": "image", "shape": list(chw.shape),
                                                                      "datatype": "UINT8", "data": chw.ravel().tolist()}],
                                                          "outputs": outputs}))
    assert status == 200, body
    saliency, grad_cam = json.loads(body)["outputs"]
    assert grad_cam["parameters"] == {"class_index": 2, "class_indices": "2,2", "layer": LAST_STAGE}
    maps = [np.array(t["data"], dtype=np.float32).reshape(t["shape"]) for t in (saliency, grad_cam)]
    assert_maps_equal(*maps, reference)

    header = json.dumps({"inputs": [{"name": "image", "shape": list(chw.shape), "datatype": "UINT8",
                                     "parameters": {"binary_data_size": chw.nbytes}}],
                         "parameters": {"binary_data_output": True, "class_index": 2},
                         "outputs": [{"name": "saliency"}, {"name": "grad_cam"}]}).encode()
    status, headers, body = http_infer(tiny_server, header + chw.tobytes(),
                                       {"Inference-Header-Content-Length": str(len(header))})
    assert status == 200, body
    length = int(headers["inference-header-content-length"])
    tensors, offset, maps = json.loads(body[:length])["outputs"], length, []
    for t in tensors:
        size = t["parameters"]["binary_data_size"]
        maps.append(np.frombuffer(body[offset: offset + size], dtype="<f4").reshape(t["shape"]))
        offset += size
    assert_maps_equal(*maps, reference)


def test_http_bad_explanation_is_400(tiny_server):
    chw = np.ascontiguousarray(random_images(1).transpose(0, 3, 1, 2))
    body = json.dumps({"inputs": [{"name": "image", "shape": list(chw.shape), "datatype": "UINT8",
                                   "data": chw.ravel().tolist()}],
                       "outputs": [{"name": "grad_cam", "parameters": {"class_index": "3"}}]})
    status, _, answer = http_infer(tiny_server, body)
    assert status == 400 and "'class_index' is '3'" in json.loads(answer)["error"]


# ----------------------------------------------------------------------------- a saturated explanation path
class Served:
    """The v2 service on a real port over a core whose explanation path has one thread, held by the
    test, and one waiting place: as create_server builds them, with the explainer as an argument."""

    def __init__(self, models_dir) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(make_config(models_dir)), self.loop).result(120)

    async def _start(self, config) -> None:
        self.pool = ThreadPoolExecutor(1)
        self.explainer = Explainer(threads=1, max_waiting=1, executor=self.pool)
        self.core = ServingCore(config, Metrics(CollectorRegistry()), device=torch.device("cpu"),
                                threads=1, instances=1, explainer=self.explainer)
        health = DrainingHealthServicer()
        self.server = grpc.aio.server()
        registration.add_service(OpenInferenceServicer(self.core, health), self.server, v2, "GRPCInferenceService")
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        await self.core.start()
        ready = getattr(self.core.repository, "starting", None)  # models beside the default may still warm
        if ready is not None:
            await asyncio.shield(ready)

    def hold(self) -> threading.Event:
        """Occupies the explanation thread until the returned event is set."""
        release = threading.Event()
        self.pool.submit(release.wait, 60)
        return release

    def stop(self) -> None:
        async def stop():
            await self.server.stop(1.0)
            await self.core.stop()
        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def _p50_seconds(stub, request, calls: int = 40) -> float:
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        assert stub.ModelInfer(request, timeout=30).outputs
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def test_model_infer_keeps_its_latency_while_explanations_are_saturated(tiny_models_dir):
    served = Served(tiny_models_dir)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{served.port}") as channel:
            stub = v2_grpc.GRPCInferenceServiceStub(channel)
            plain = image_request(random_images(4, seed=65))
            explain = image_request(random_images(1, seed=66), outputs=explain_outputs())
            stub.ModelInfer(explain, timeout=30)  # loads the explainable copy before the clock starts
            idle = _p50_seconds(stub, plain)

            release = served.hold()
            waiting = [stub.ModelInfer.future(explain, timeout=60) for _ in range(2)]  # the thread's and the queue's
            deadline = time.monotonic() + 10
            while served.explainer.in_use < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
            with pytest.raises(grpc.RpcError) as busy:  # the path is full: refused at once, not queued
                stub.ModelInfer(explain, timeout=30)
            assert busy.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "retry later" in busy.value.details()
            saturated = _p50_seconds(stub, plain)
            assert not any(w.done() for w in waiting)
            release.set()
            for future in waiting:
                assert [t.name for t in future.result(30).outputs] == ["saliency", "grad_cam"]
        print(f"\nModelInfer of 4 images, p50 of 40 calls: idle {idle * 1e3:.2f} ms, "
              f"explanation path saturated {saturated * 1e3:.2f} ms")
        assert saturated < 1.0  # a bound that cannot flake; the figures printed show the usual range
    finally:
        served.stop()


def test_an_explanation_answered_as_json_reserves_what_its_text_holds(tiny_server):
    core = tiny_server.app.core
    model = core.model("tiny-max")

    async def both():
        binary = core.reserve_explanation(model, images=8, request_bytes=0)
        text = core.reserve_explanation(model, images=8, request_bytes=0, value_bytes=32)
        sizes = binary.nbytes, text.nbytes
        binary.release(), text.release()
        return sizes

    binary, text = tiny_server.run(both())
    maps = 8 * 2 * 32 * 32  # two input-sized maps per image
    assert text - binary == 3 * maps * (32 - 4)  # every held copy of every value, at its JSON size
