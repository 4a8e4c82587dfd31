"""The Open Inference Protocol (KServe v2) on the real server, through the project's own generated
stubs: every RPC, raw and typed contents, every error class followed by a valid request, concurrent
callers, and the same scores as the own API."""

from __future__ import annotations

import struct
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from cifar10_serving.client import ClassifierClient
from cifar10_serving.protos.cifar10.v1 import classifier_pb2 as pb
from cifar10_serving.protos.cifar10.v1 import classifier_pb2_grpc as pb_grpc
from cifar10_serving.protos.inference import open_inference_grpc_pb2 as v2
from cifar10_serving.protos.inference import open_inference_grpc_pb2_grpc as v2_grpc
from tests.helpers.faulty_model import HOG, POISON, export_faulty, marked
from tests.helpers.images import encode, random_images
from tests.helpers.servers import RunningServer, make_config
from tests.helpers.faults import hold_the_model, slow_units, wait_for
from tests.test_security import TOKENS, pki, tls_token_server  # noqa: F401 (fixtures)

Input = v2.ModelInferRequest.InferInputTensor
Output = v2.ModelInferRequest.InferRequestedOutputTensor


@pytest.fixture()
def stub(tiny_server):
    with grpc.insecure_channel(tiny_server.target) as channel:
        yield v2_grpc.GRPCInferenceServiceStub(channel)


@pytest.fixture()
def own(tiny_server):
    with grpc.insecure_channel(tiny_server.target) as channel:
        yield pb_grpc.ClassifierStub(channel)


# ----------------------------------------------------------------------------- requests and answers
def image_request(images_hwc: np.ndarray, model: str = "tiny-max", datatype: str = "UINT8", raw: bool = True,
                  outputs=(), **fields) -> v2.ModelInferRequest:
    """The ``image`` input, N x 3 x 32 x 32, as raw contents or typed."""
    chw = np.ascontiguousarray(images_hwc.transpose(0, 3, 1, 2))
    if datatype == "FP32":
        chw = chw.astype(np.float32) / np.float32(255.0)
    tensor = Input(name="image", datatype=datatype, shape=chw.shape)
    request = v2.ModelInferRequest(model_name=model, inputs=[tensor], outputs=list(outputs), **fields)
    if raw:
        request.raw_input_contents.append(chw.astype("<f4" if datatype == "FP32" else np.uint8).tobytes())
    elif datatype == "FP32":
        request.inputs[0].contents.fp32_contents.extend(chw.ravel().tolist())
    else:
        request.inputs[0].contents.uint_contents.extend(chw.ravel().tolist())
    return request


def files_request(files: list[bytes], model: str = "tiny-max", raw: bool = True, outputs=()) -> v2.ModelInferRequest:
    """The ``encoded_image`` input: BYTES [N], raw (length-prefixed) or typed."""
    tensor = Input(name="encoded_image", datatype="BYTES", shape=[len(files)])
    request = v2.ModelInferRequest(model_name=model, inputs=[tensor], outputs=list(outputs))
    if raw:
        request.raw_input_contents.append(b"".join(struct.pack("<I", len(f)) + f for f in files))
    else:
        request.inputs[0].contents.bytes_contents.extend(files)
    return request


def outputs_of(response: v2.ModelInferResponse) -> dict[str, np.ndarray]:
    """Every output as a numpy array of its shape, from raw or typed contents."""
    arrays = {}
    for i, tensor in enumerate(response.outputs):
        if response.raw_output_contents:
            data = response.raw_output_contents[i]
            if tensor.datatype == "BYTES":
                items, offset = [], 0
                while offset < len(data):
                    (n,) = struct.unpack_from("<I", data, offset)
                    items.append(data[offset + 4: offset + 4 + n])
                    offset += 4 + n
                array = np.array(items, dtype=object)
            else:
                array = np.frombuffer(data, dtype={"FP32": "<f4", "FP16": "<f2"}[tensor.datatype])
        elif tensor.datatype == "BYTES":
            array = np.array(list(tensor.contents.bytes_contents), dtype=object)
        else:
            array = np.array(tensor.contents.fp32_contents, dtype=np.float32)
        arrays[tensor.name] = array.reshape(tuple(tensor.shape))
    return arrays


def own_scores(own, images_hwc: np.ndarray, model: str = "tiny-max", **fields) -> pb.ClassifyResponse:
    raw = [pb.Image(raw=pb.RawTensor(shape=img.shape, layout=pb.LAYOUT_HWC, data=img.tobytes())) for img in images_hwc]
    return own.Classify(pb.ClassifyRequest(model=model, images=raw, **fields), timeout=30)


def probabilities(response: pb.ClassifyResponse) -> np.ndarray:
    return np.array([list(r.probabilities) for r in response.results], dtype=np.float32)


# ----------------------------------------------------------------------------- health and metadata
def test_live_ready_and_server_metadata(stub):
    assert stub.ServerLive(v2.ServerLiveRequest(), timeout=10).live
    assert stub.ServerReady(v2.ServerReadyRequest(), timeout=10).ready
    meta = stub.ServerMetadata(v2.ServerMetadataRequest(), timeout=10)
    assert meta.name == "cifar10-serving" and meta.version and list(meta.extensions) == ["classification", "model_configuration", "statistics", "model_repository"]


def test_model_ready_for_loaded_models_and_versions_only(stub, own):
    version = own.GetModelInfo(pb.GetModelInfoRequest(name="tiny-avg"), timeout=10).version
    assert stub.ModelReady(v2.ModelReadyRequest(name="tiny-avg"), timeout=10).ready
    assert stub.ModelReady(v2.ModelReadyRequest(name="tiny-avg", version=version), timeout=10).ready
    assert not stub.ModelReady(v2.ModelReadyRequest(name="tiny-avg", version=version + "9"), timeout=10).ready
    assert not stub.ModelReady(v2.ModelReadyRequest(name="resnet-9000"), timeout=10).ready


def test_the_health_service_and_reflection_know_the_v2_service(tiny_server):
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    with grpc.insecure_channel(tiny_server.target) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="inference.GRPCInferenceService"), timeout=10).status
        assert status == health_pb2.HealthCheckResponse.SERVING
        db = ProtoReflectionDescriptorDatabase(channel)
        assert "inference.GRPCInferenceService" in set(db.get_services())
        assert db.FindFileContainingSymbol("inference.ModelInferRequest").name.endswith("open_inference_grpc.proto")


@pytest.mark.parametrize("model", ["tiny-max", "tiny-avg"])
def test_model_metadata_lists_the_inputs_scores_and_every_layer(stub, own, model):
    info = own.GetModelInfo(pb.GetModelInfoRequest(name=model), timeout=10)
    meta = stub.ModelMetadata(v2.ModelMetadataRequest(name=model), timeout=10)
    assert (meta.name, list(meta.versions), meta.platform) == (model, [info.version], "pytorch_torchscript")
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [
        ("image", "UINT8", [-1, 3, 32, 32]), ("encoded_image", "BYTES", [-1, 1])]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == [
        ("probabilities", "FP32", [-1, 10]),
        *((layer.name, "FP32", [-1, *layer.output_shape]) for layer in info.layers),
        ("saliency", "FP32", [-1, 32, 32]), ("grad_cam", "FP32", [-1, 32, 32])]  # the explanations, last
    same = stub.ModelMetadata(v2.ModelMetadataRequest(name=model, version=info.version), timeout=10)
    assert same == meta


def test_readiness_follows_the_health_service(tiny_models_dir):
    running = RunningServer(make_config(tiny_models_dir))
    try:
        with grpc.insecure_channel(running.target) as channel:
            stub = v2_grpc.GRPCInferenceServiceStub(channel)
            assert stub.ServerReady(v2.ServerReadyRequest(), timeout=10).ready
            running.run(running.app.health.enter_graceful_shutdown())  # what App.stop does first
            assert not stub.ServerReady(v2.ServerReadyRequest(), timeout=10).ready
            assert not stub.ModelReady(v2.ModelReadyRequest(name="tiny-max"), timeout=10).ready
            assert stub.ServerLive(v2.ServerLiveRequest(), timeout=10).live  # alive while draining
            running.stop(grace=2.0)
            with pytest.raises(grpc.RpcError) as info:
                stub.ModelInfer(image_request(random_images(1)), timeout=5)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        if not running.loop.is_closed():
            running.stop(grace=1.0)


# ----------------------------------------------------------------------------- inference
@pytest.mark.parametrize("model", ["tiny-max", "tiny-avg"])
def test_raw_uint8_scores_equal_the_own_apis(stub, own, model):
    images = random_images(5, seed=31)
    response = stub.ModelInfer(image_request(images, model=model, id="req-7"), timeout=30)
    assert (response.model_name, response.id) == (model, "req-7")
    assert response.model_version == own.GetModelInfo(pb.GetModelInfoRequest(name=model), timeout=10).version
    assert [t.name for t in response.outputs] == ["probabilities"]  # the default: scores only
    np.testing.assert_array_equal(outputs_of(response)["probabilities"], probabilities(own_scores(own, images, model)))


@pytest.mark.parametrize("datatype", ["UINT8", "FP32"])
def test_typed_contents_are_answered_typed_with_the_same_scores(stub, own, datatype):
    images = random_images(3, seed=32)
    response = stub.ModelInfer(image_request(images, datatype=datatype, raw=False), timeout=30)
    assert not response.raw_output_contents and response.outputs[0].contents.fp32_contents
    np.testing.assert_array_equal(outputs_of(response)["probabilities"], probabilities(own_scores(own, images)))


def test_raw_fp32_images_equal_the_own_apis_float32(stub, own):
    images = random_images(2, seed=33)
    floats = [pb.Image(raw=pb.RawTensor(shape=img.shape, layout=pb.LAYOUT_HWC, dtype=pb.DTYPE_FLOAT32,
                                        data=(img.astype(np.float32) / np.float32(255.0)).tobytes())) for img in images]
    expected = probabilities(own.Classify(pb.ClassifyRequest(images=floats), timeout=30))
    got = outputs_of(stub.ModelInfer(image_request(images, datatype="FP32"), timeout=30))["probabilities"]
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("raw", [True, False], ids=["raw", "typed"])
def test_encoded_images_equal_the_own_apis(stub, own, raw):
    images = random_images(3, seed=34)
    big = np.kron(images[0], np.ones((2, 2, 1), dtype=np.uint8))  # 64x64: scaled and centre-cropped
    files = [encode(images[1]), encode(images[2], "JPEG", quality=90), encode(big)]
    expected = probabilities(own.Classify(pb.ClassifyRequest(images=[pb.Image(encoded=f) for f in files]), timeout=30))
    got = outputs_of(stub.ModelInfer(files_request(files, raw=raw), timeout=30))["probabilities"]
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("raw", [True, False], ids=["raw", "typed"])
def test_classification_extension_answers_the_own_apis_top_k(stub, own, raw):
    images = random_images(4, seed=35)
    top = Output(name="probabilities")
    top.parameters["classification"].int64_param = 3
    response = stub.ModelInfer(image_request(images, raw=raw, outputs=[top]), timeout=30)
    (tensor,) = response.outputs
    assert (tensor.name, tensor.datatype, list(tensor.shape)) == ("probabilities", "BYTES", [4, 3])
    strings = outputs_of(response)["probabilities"]
    expected = own_scores(own, images, top_k=3)
    for row, result in zip(strings, expected.results):
        parsed = [s.decode().split(":") for s in row]
        assert [(int(i), label) for _, i, label in parsed] == [(p.index, p.label) for p in result.top_k]
        assert [score for score, _, _ in parsed] == [str(np.float32(p.probability)) for p in result.top_k]  # exact, short


def test_feature_maps_on_request_with_the_metadatas_shape(stub, own):
    images = random_images(2, seed=36)
    meta = {t.name: list(t.shape) for t in stub.ModelMetadata(v2.ModelMetadataRequest(name="tiny-max"), timeout=10).outputs}
    half = Output(name="stage1.conv1")
    half.parameters["datatype"].string_param = "FP16"
    outputs = [Output(name="stage2.pool"), Output(name="probabilities"), half]
    response = stub.ModelInfer(image_request(images, outputs=outputs), timeout=30)
    assert [t.name for t in response.outputs] == ["stage2.pool", "probabilities", "stage1.conv1"]  # as asked
    assert [t.datatype for t in response.outputs] == ["FP32", "FP32", "FP16"]
    got = outputs_of(response)
    ref = own_scores(own, images, feature_layers=["stage1.conv1", "stage2.pool"])
    for i, result in enumerate(ref.results):
        maps = {m.layer: np.frombuffer(m.data, "<f4").reshape(tuple(m.shape)) for m in result.feature_maps}
        np.testing.assert_array_equal(got["stage2.pool"][i], maps["stage2.pool"])
        np.testing.assert_allclose(got["stage1.conv1"][i], maps["stage1.conv1"], rtol=2e-3, atol=2e-3)
    assert list(got["stage2.pool"].shape) == [2, *meta["stage2.pool"][1:]]
    assert list(got["stage1.conv1"].shape) == [2, *meta["stage1.conv1"][1:]]
    np.testing.assert_array_equal(got["probabilities"], probabilities(ref))


def test_concurrent_callers_get_their_own_answers(stub, own):
    images = random_images(24, seed=37)
    expected = probabilities(own_scores(own, images))

    def call(i):
        return outputs_of(stub.ModelInfer(image_request(images[i:i + 1], id=str(i)), timeout=60))["probabilities"][0]

    with ThreadPoolExecutor(12) as pool:
        got = list(pool.map(call, range(len(images))))
    np.testing.assert_allclose(np.stack(got), expected, atol=1e-6)  # batched with others: same to float rounding


def test_metrics_count_v2_calls_by_method(tiny_server, stub):
    registry = tiny_server.app.metrics.registry
    labels = {"method": "ModelInfer", "model": "tiny-max", "code": "OK"}
    before = registry.get_sample_value("cifar10_requests_total", labels) or 0.0
    images_before = registry.get_sample_value("cifar10_images_total", {"model": "tiny-max", "outcome": "ok"}) or 0.0
    stub.ModelInfer(image_request(random_images(3, seed=38)), timeout=30)
    with pytest.raises(grpc.RpcError):
        stub.ModelInfer(image_request(random_images(1), model="resnet-9000"), timeout=30)
    assert registry.get_sample_value("cifar10_requests_total", labels) == before + 1
    assert registry.get_sample_value("cifar10_images_total", {"model": "tiny-max", "outcome": "ok"}) == images_before + 3
    assert registry.get_sample_value("cifar10_requests_total",
                                     {"method": "ModelInfer", "model": "unknown", "code": "NOT_FOUND"}) >= 1
    assert registry.get_sample_value("cifar10_requests_in_flight", {"method": "ModelInfer"}) == 0


# ----------------------------------------------------------------------------- errors
GOOD = random_images(1, seed=39)


def _with(request: v2.ModelInferRequest, change) -> v2.ModelInferRequest:
    change(request)
    return request


def _output(name: str, **params) -> Output:
    out = Output(name=name)
    for key, value in params.items():
        field = {int: "int64_param", str: "string_param", bool: "bool_param"}[type(value)]
        setattr(out.parameters[key], field, value)
    return out


BAD_INFER = {
    "wrong shape": (lambda: _with(image_request(GOOD), lambda r: r.inputs[0].shape.__setitem__(2, 31)),
                    grpc.StatusCode.INVALID_ARGUMENT, "input 'image': shape [1, 3, 31, 32]"),
    "wrong dtype": (lambda: _with(image_request(GOOD), lambda r: setattr(r.inputs[0], "datatype", "INT64")),
                    grpc.StatusCode.INVALID_ARGUMENT, "input 'image': datatype 'INT64'"),
    "byte count": (lambda: _with(image_request(GOOD), lambda r: r.raw_input_contents.__setitem__(0, b"\0" * 100)),
                   grpc.StatusCode.INVALID_ARGUMENT, "input 'image': raw contents are 100 bytes"),
    "typed count": (lambda: _with(image_request(GOOD, raw=False), lambda r: r.inputs[0].contents.uint_contents.pop()),
                    grpc.StatusCode.INVALID_ARGUMENT, "input 'image': 3071 elements"),
    "uint8 range": (lambda: _with(image_request(GOOD, raw=False),
                                  lambda r: r.inputs[0].contents.uint_contents.__setitem__(0, 256)),
                    grpc.StatusCode.INVALID_ARGUMENT, "0..255"),
    "fp32 range": (lambda: _with(image_request(GOOD, datatype="FP32"),
                                 lambda r: r.raw_input_contents.__setitem__(0, np.full(3072, 2.0, "<f4").tobytes())),
                   grpc.StatusCode.INVALID_ARGUMENT, "[0, 1]"),
    "fp32 nan": (lambda: _with(image_request(GOOD, datatype="FP32"),
                               lambda r: r.raw_input_contents.__setitem__(0, np.full(3072, np.nan, "<f4").tobytes())),
                 grpc.StatusCode.INVALID_ARGUMENT, "NaN"),
    "no images": (lambda: _with(image_request(GOOD), lambda r: (r.inputs[0].shape.__setitem__(0, 0),
                                                               r.raw_input_contents.__setitem__(0, b""))),
                  grpc.StatusCode.INVALID_ARGUMENT, "0 images"),
    "over the batch limit": (lambda: image_request(random_images(65)), grpc.StatusCode.INVALID_ARGUMENT, "65 images"),
    "unknown input": (lambda: _with(image_request(GOOD), lambda r: setattr(r.inputs[0], "name", "INPUT__0")),
                      grpc.StatusCode.INVALID_ARGUMENT, "no input 'INPUT__0'"),
    "two inputs": (lambda: _with(image_request(GOOD), lambda r: (r.inputs.append(r.inputs[0]),
                                                                r.raw_input_contents.append(r.raw_input_contents[0]))),
                   grpc.StatusCode.INVALID_ARGUMENT, "2 input tensors"),
    "no input": (lambda: v2.ModelInferRequest(model_name="tiny-max"), grpc.StatusCode.INVALID_ARGUMENT, "0 input"),
    "raw and typed": (lambda: _with(image_request(GOOD), lambda r: r.inputs[0].contents.uint_contents.append(1)),
                      grpc.StatusCode.INVALID_ARGUMENT, "both raw_input_contents and typed"),
    "not an image": (lambda: files_request([b"GIF89a not really"]), grpc.StatusCode.INVALID_ARGUMENT,
                     "input 'encoded_image': image 0: not a PNG or JPEG"),
    "bytes truncated": (lambda: _with(files_request([encode(GOOD[0])]),
                                      lambda r: r.raw_input_contents.__setitem__(0, r.raw_input_contents[0][:-1])),
                        grpc.StatusCode.INVALID_ARGUMENT, "input 'encoded_image': element 0 declares"),
    "bytes count": (lambda: _with(files_request([encode(GOOD[0])], raw=False), lambda r: r.inputs[0].shape.__setitem__(0, 2)),
                    grpc.StatusCode.INVALID_ARGUMENT, "input 'encoded_image': 1 elements"),
    "unknown output": (lambda: image_request(GOOD, outputs=[Output(name="OUTPUT__0")]), grpc.StatusCode.INVALID_ARGUMENT,
                       "no output 'OUTPUT__0'"),
    "output twice": (lambda: image_request(GOOD, outputs=[Output(name="stage1.pool")] * 2),
                     grpc.StatusCode.INVALID_ARGUMENT, "output 'stage1.pool' asked for twice"),
    "classification k": (lambda: image_request(GOOD, outputs=[_output("probabilities", classification=11)]),
                         grpc.StatusCode.INVALID_ARGUMENT, "'classification' is 11"),
    "classification of a layer": (lambda: image_request(GOOD, outputs=[_output("stage1.pool", classification=2)]),
                                  grpc.StatusCode.INVALID_ARGUMENT, "output 'stage1.pool': 'classification'"),
    "feature datatype": (lambda: image_request(GOOD, outputs=[_output("stage1.pool", datatype="FP64")]),
                         grpc.StatusCode.INVALID_ARGUMENT, "output 'stage1.pool': 'datatype'"),
    "fp16 typed": (lambda: image_request(GOOD, raw=False, outputs=[_output("stage1.pool", datatype="FP16")]),
                   grpc.StatusCode.INVALID_ARGUMENT, "FP16 travels only as raw"),
    "request parameter": (lambda: _with(image_request(GOOD), lambda r: setattr(r.parameters["priority"], "uint64_param", 1)),
                          grpc.StatusCode.INVALID_ARGUMENT, "parameter 'priority' not offered"),
    "shared memory": (lambda: image_request(GOOD, outputs=[_output("probabilities", shared_memory_region="r")]),
                      grpc.StatusCode.INVALID_ARGUMENT, "'shared_memory_region' not offered"),
    "unknown model": (lambda: image_request(GOOD, model="resnet-9000"), grpc.StatusCode.NOT_FOUND, "resnet-9000"),
    "unknown version": (lambda: image_request(GOOD, model_version="7"), grpc.StatusCode.NOT_FOUND, "no ready version '7'"),
}


@pytest.mark.parametrize("case", list(BAD_INFER))
def test_bad_requests_get_their_status_naming_the_tensor_and_the_server_keeps_serving(stub, case):
    make, code, words = BAD_INFER[case]
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(make(), timeout=30)
    assert info.value.code() == code
    assert words in info.value.details()
    assert len(outputs_of(stub.ModelInfer(image_request(GOOD), timeout=30))["probabilities"]) == 1


def test_metadata_of_an_unknown_model_or_version_is_not_found(stub):
    for request in (v2.ModelMetadataRequest(name="resnet-9000"), v2.ModelMetadataRequest(name="tiny-max", version="7")):
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelMetadata(request, timeout=10)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert stub.ModelMetadata(v2.ModelMetadataRequest(name="tiny-max"), timeout=10).name == "tiny-max"


def test_a_message_that_does_not_parse_is_invalid_argument(tiny_server, stub):
    with grpc.insecure_channel(tiny_server.target) as channel:
        call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")  # bytes in, bytes out
        with pytest.raises(grpc.RpcError) as info:
            call(b"\xff\xff\xff", timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert stub.ModelInfer(image_request(GOOD), timeout=30).outputs


def test_v2_needs_the_token_and_works_over_tls(tls_token_server, pki):  # noqa: F811 (fixtures)
    from cifar10_serving.client import tls_credentials

    with grpc.secure_channel(tls_token_server.target, tls_credentials(pki["ca"])) as channel:
        stub = v2_grpc.GRPCInferenceServiceStub(channel)
        for rpc, request in ((stub.ServerReady, v2.ServerReadyRequest()), (stub.ModelInfer, image_request(GOOD))):
            with pytest.raises(grpc.RpcError) as info:
                rpc(request, timeout=10)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        token = (("authorization", f"Bearer {TOKENS[0]}"),)
        assert stub.ServerReady(v2.ServerReadyRequest(), timeout=10, metadata=token).ready
        assert stub.ModelInfer(image_request(GOOD), timeout=30, metadata=token).outputs


# ----------------------------------------------------------------------------- faults in the model path
@pytest.fixture(scope="module")
def faulty(tmp_path_factory):
    directory = tmp_path_factory.mktemp("faulty-v2")
    export_faulty(directory, "faulty")
    registry = CollectorRegistry()
    running = RunningServer(make_config(directory, default_model="faulty", max_batch_size=4, max_queue_images=4,
                                        max_queue_delay_us=0), registry)
    running.registry = registry
    yield running
    running.stop(grace=1.0)


def test_model_failures_and_a_full_queue_have_the_own_apis_codes(faulty):
    good = random_images(1, seed=40)
    with grpc.insecure_channel(faulty.target) as channel, ClassifierClient(faulty.target, timeout=120) as client:
        stub = v2_grpc.GRPCInferenceServiceStub(channel)
        for marker, code in ((POISON, grpc.StatusCode.INTERNAL), (HOG, grpc.StatusCode.RESOURCE_EXHAUSTED)):
            with pytest.raises(grpc.RpcError) as info:
                stub.ModelInfer(image_request(marked(good[0], marker)[None], model="faulty"), timeout=60)
            assert info.value.code() == code and "failed on this batch" in info.value.details()
            assert stub.ModelInfer(image_request(good, model="faulty"), timeout=60).outputs

        # Hold the model with a slow image, fill the queue of 4 with one v2 request, and one more is shed.
        thread, _ = hold_the_model(faulty, client, slow_units(client, seconds=3.0))
        queued = []
        filler = threading.Thread(target=lambda: queued.append(
            stub.ModelInfer(image_request(random_images(4, seed=41), model="faulty"), timeout=120)))
        filler.start()
        wait_for(lambda: faulty.registry.get_sample_value("cifar10_queue_images", {"model": "faulty"}) == 4)
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(image_request(good, model="faulty"), timeout=30)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "Retry with backoff" in info.value.details()
        thread.join(120)
        filler.join(120)
        assert len(outputs_of(queued[0])["probabilities"]) == 4  # what was queued was answered
        assert stub.ModelInfer(image_request(good, model="faulty"), timeout=60).outputs


# ----------------------------------------------------------------------------- fuzzing the request parser
FUZZ = settings(max_examples=150, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
PARAM = st.one_of(st.builds(lambda v: v2.InferParameter(int64_param=v), st.integers(-2, 12)),
                  st.builds(lambda v: v2.InferParameter(string_param=v), st.sampled_from(["FP16", "FP32", "x", ""])),
                  st.builds(lambda v: v2.InferParameter(bool_param=v), st.booleans()))
TENSOR = st.builds(
    lambda name, datatype, shape, uints, floats, blobs: Input(
        name=name, datatype=datatype, shape=shape,
        contents=v2.InferTensorContents(uint_contents=uints, fp32_contents=floats, bytes_contents=blobs)),
    name=st.sampled_from(["image", "encoded_image", "INPUT__0", ""]),
    datatype=st.sampled_from(["UINT8", "FP32", "BYTES", "FP16", ""]),
    shape=st.lists(st.sampled_from([-1, 0, 1, 2, 3, 31, 32, 65, 2**40]), max_size=5),
    uints=st.lists(st.integers(0, 300), max_size=8), floats=st.lists(st.floats(width=32), max_size=8),
    blobs=st.lists(st.binary(max_size=64), max_size=3))
OUTPUT = st.builds(lambda name, params: Output(name=name, parameters=params),
                   name=st.sampled_from(["probabilities", "stage1.pool", "nope"]),
                   params=st.dictionaries(st.sampled_from(["classification", "datatype", "other"]), PARAM, max_size=2))


@FUZZ
@given(inputs=st.lists(TENSOR, max_size=2), raw=st.lists(st.binary(max_size=64), max_size=2),
       outputs=st.lists(OUTPUT, max_size=3), model=st.sampled_from(["tiny-max", "", "nope"]),
       version=st.sampled_from(["", "test", "9"]))
def test_fuzz_any_request_is_answered_or_refused_with_a_callers_code(stub, inputs, raw, outputs, model, version):
    request = v2.ModelInferRequest(model_name=model, model_version=version, inputs=inputs, outputs=outputs,
                                   raw_input_contents=raw)
    try:
        response = stub.ModelInfer(request, timeout=30)
    except grpc.RpcError as exc:
        assert exc.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND), exc.details()
        return
    assert len(response.outputs) == max(1, len(outputs))
