"""GetFilters against a real server: the weights are those of the same .pt file, read with torch; the
downsampling worked examples follow from the maps the server returns; bad requests have their codes;
an answer over the budget is refused and the server goes on."""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from torch.nn import functional as F

from cifar10_serving.client import ClassifierClient, ClassifierError
from cifar10_serving.client.inspect_page import load_input
from cifar10_serving.client.worked_examples import contributions, downsampling_example
from tests.helpers.images import random_images
from tests.helpers.servers import RunningServer, make_config

ROOT = Path(__file__).resolve().parent.parent
BUNDLED_MODELS = ROOT / "model" / "artifacts"
CAT = ROOT / "examples" / "cat.jpg"
WEIGHTED = ("patch_whitening", "conv", "conv_downsample", "fc")
DOWNSAMPLING = ("maxpool", "avgpool", "conv_downsample")


def file_weights(path: Path) -> dict[str, torch.Tensor]:
    """Every parameter of the file, by module path (``stages.stage1.conv1.weight``), from its own load."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {name: p.detach() for name, p in torch.jit.load(str(path)).named_parameters()}


def module_path(layer: str) -> str:
    """model/'s layer names drop the ``stages.`` container of the stages."""
    return f"stages.{layer}" if layer.startswith("stage") else layer


def check_examples(client: ClassifierClient, model: str, pixels, weights=None) -> int:
    """Every downsampling layer's worked example against the pooling of the returned maps; returns how many."""
    info = client.model_info(model)
    maps = client.classify([pixels], model=model, layers=["*"])[0].feature_maps
    checked = 0
    for before, layer in zip(info.layers, info.layers[1:]):
        if layer.kind not in DOWNSAMPLING:
            continue
        w = None if weights is None or layer.name not in weights else weights[layer.name].weight
        example = downsampling_example(layer.kind, maps[before.name], maps[layer.name], layer.kernel, layer.stride, w)
        assert example is not None, layer.name
        side = (2 - 1) * layer.stride + layer.kernel
        assert example.patch.shape == (side, side) and example.result.shape == (2, 2)
        row, col = example.top // layer.stride, example.left // layer.stride
        np.testing.assert_array_equal(example.result, maps[layer.name][example.channel, row:row + 2, col:col + 2])
        for a in range(2):
            for b in range(2):
                values = example.window_values(a, b)
                if layer.kind == "maxpool":
                    assert example.result[a, b] == values.max()  # max pooling picks one of the four exactly
                elif layer.kind == "avgpool":
                    assert example.result[a, b] == pytest.approx(values.mean(), rel=1e-5, abs=1e-6)
                else:  # a strided convolution: every input channel's window times its slice, summed
                    top, left = example.top + a * layer.stride, example.left + b * layer.stride
                    windows = maps[before.name][:, top:top + layer.kernel, left:left + layer.kernel]
                    total = float((windows * w[example.channel]).sum())
                    assert example.result[a, b] == pytest.approx(total, rel=1e-4, abs=1e-4)
                    assert example.share[a, b] == pytest.approx(example.expected(a, b), rel=1e-5, abs=1e-6)
        checked += 1
    return checked


@pytest.mark.system
def test_bundled_filters_are_the_weights_in_the_file():
    """Every convolution (and the fc layer) of base-max and base-conv, against torch's own load of the
    same file; the worked examples against the maps; and the kernels are the ones that made the maps."""
    running = RunningServer(make_config(BUNDLED_MODELS, default_model="base-max", load_models="base-max,base-conv"))
    try:
        with ClassifierClient(running.target, timeout=60) as client:
            for model in ("base-max", "base-conv"):
                info = client.model_info(model)
                params = file_weights(BUNDLED_MODELS / f"{model}.pt")
                filters = client.filters(model)
                assert list(filters) == [layer.name for layer in info.layers if layer.kind in WEIGHTED]
                for name, got in filters.items():
                    weight = params[module_path(name) + ".weight"].numpy()
                    assert got.weight.dtype == np.float32
                    np.testing.assert_array_equal(got.weight, weight)
                    bias = params.get(module_path(name) + ".bias")
                    assert (got.bias is None) == (bias is None)
                    if bias is not None:
                        np.testing.assert_array_equal(got.bias, bias.numpy())
                half = client.filters(model, layers=[next(iter(filters))], dtype="float16")
                name, got = next(iter(half.items()))
                assert got.weight.dtype == np.float16
                np.testing.assert_array_equal(got.weight, params[module_path(name) + ".weight"].half().numpy())
                pixels = load_input(CAT)
                assert check_examples(client, model, pixels, filters) == 3
            # The trained kernels, batch norm not folded in, are what made the conv layer's map.
            maps = client.classify([pixels], model="base-max", layers=["stage1.act1", "stage1.conv2",
                                                                       "head.flatten", "classifier.fc"])[0]
            w = client.filters("base-max", layers=["stage1.conv2", "classifier.fc"])
            again = F.conv2d(torch.from_numpy(maps.feature_maps["stage1.act1"].copy())[None],
                             torch.from_numpy(w["stage1.conv2"].weight.copy()), padding=1)[0].numpy()
            np.testing.assert_allclose(again, maps.feature_maps["stage1.conv2"], rtol=1e-4, atol=1e-4)
            # The contributions and the bias add up to the top class's score.
            fc = w["classifier.fc"]
            top = maps.top_k[0].index
            parts = contributions(maps.feature_maps["head.flatten"], fc.weight, top)
            assert parts[0].product >= parts[-1].product
            assert sum(p.product for p in parts) + fc.bias[top] == pytest.approx(
                maps.feature_maps["classifier.fc"][top], rel=1e-4, abs=1e-4)
    finally:
        running.stop(grace=1.0)


@pytest.mark.parametrize("model", ["tiny-max", "tiny-avg"])
def test_pooling_examples_are_the_pooling_of_the_returned_maps(tiny_client, model):
    for image in random_images(2, seed=3):
        assert check_examples(tiny_client, model, image) == 3  # tiny-avg's windows of 3 overlap


def test_tiny_filters_are_the_weights_in_the_file(tiny_client, tiny_models_dir):
    params = file_weights(tiny_models_dir / "tiny-avg.pt")
    filters = tiny_client.filters("tiny-avg", layers=["classifier.fc", "stage2.conv1"])
    assert list(filters) == ["stage2.conv1", "classifier.fc"]  # the model's order, not the request's
    assert filters["stage2.conv1"].weight.shape == (8, 4, 3, 3) and filters["stage2.conv1"].bias is None
    np.testing.assert_array_equal(filters["stage2.conv1"].weight, params["stages.stage2.conv1.weight"].numpy())
    np.testing.assert_array_equal(filters["classifier.fc"].bias, params["classifier.fc.bias"].numpy())
    assert list(tiny_client.filters(layers=["*"])) == list(tiny_client.filters())


@pytest.mark.parametrize("options, code, words", [
    ({"layers": ["stage9.conv1"]}, grpc.StatusCode.INVALID_ARGUMENT, "has no layer 'stage9.conv1'; layers with weights: stage1.conv1"),
    ({"layers": ["stage1.bn1"]}, grpc.StatusCode.INVALID_ARGUMENT, "is batchnorm, which has no filters; layers with weights"),
    ({"layers": ["stage1.pool"]}, grpc.StatusCode.INVALID_ARGUMENT, "is maxpool, which has no filters"),
    ({"layers": ["*", "stage1.conv1"]}, grpc.StatusCode.INVALID_ARGUMENT, "send it alone"),
    ({"layers": ["stage1.conv1", "stage1.conv1"]}, grpc.StatusCode.INVALID_ARGUMENT, "asked for twice"),
    ({"model": "nope"}, grpc.StatusCode.NOT_FOUND, "'nope' is not loaded"),
])
def test_bad_requests_have_their_code_and_the_server_goes_on(tiny_client, options, code, words):
    with pytest.raises(ClassifierError) as caught:
        tiny_client.filters(**options)
    assert caught.value.code == code and words in caught.value.details
    assert tiny_client.filters(layers=["stage1.conv1"])["stage1.conv1"].weight.shape == (4, 3, 3, 3)
    assert tiny_client.classify(list(random_images(1)))[0].label


def test_a_dtype_not_offered_is_refused(tiny_client):
    from cifar10_serving.protos.cifar10.v1 import classifier_pb2 as pb

    with pytest.raises(ClassifierError) as caught:
        tiny_client._call(tiny_client._stub().GetFilters, pb.GetFiltersRequest(dtype=pb.DTYPE_UINT8), 10)
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT and "use FLOAT32 or FLOAT16" in caught.value.details


def test_weights_over_the_budget_are_refused_and_the_server_goes_on(tiny_models_dir):
    # 20 kB of budget, 15 kB of it for large answers: one layer fits, every layer (about 37 kB) does not.
    running = RunningServer(make_config(tiny_models_dir, answer_budget_bytes=20_000))
    try:
        with ClassifierClient(running.target, timeout=30) as client:
            with pytest.raises(ClassifierError) as caught:
                client.filters()
            assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "ask for fewer layers (this asks for 7), or dtype FLOAT16" in caught.value.details
            assert client.filters(layers=["stage1.conv1"])["stage1.conv1"].weight.shape == (4, 3, 3, 3)
            deadline = time.monotonic() + 10  # given back once gRPC has written the answer: just after
            while running.app.core.budget.in_use and time.monotonic() < deadline:
                time.sleep(0.01)
            assert running.app.core.budget.in_use == 0
            assert client.classify(list(random_images(1)))[0].label
    finally:
        running.stop(grace=1.0)
