"""The GPU path: the shipped artifacts on CUDA, in-process and through a real server.

Skipped where there is no CUDA device (CI has none); run on a GPU machine with
``python -m pytest tests/test_cuda.py``.
"""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cifar10_serving.client import ClassifierClient
from cifar10_serving.server.models import load_artifact
from tests.helpers.servers import RunningServer, make_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "model" / "artifacts"
EXAMPLES = sorted((ROOT / "examples").glob("*.jpg"))
# TF32 convolutions (PyTorch's default on CUDA) round inputs to 10-bit mantissas: scores move by ~1e-3
ATOL = 2e-2


def _examples() -> np.ndarray:
    return np.stack([np.asarray(Image.open(p).convert("RGB")) for p in EXAMPLES])  # N x 32 x 32 x 3


def _nchw(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()


@pytest.mark.parametrize("path", sorted(ARTIFACTS.glob("*.pt")), ids=lambda p: p.stem)
def test_artifact_on_cuda_agrees_with_cpu(path):
    cpu = load_artifact(path, torch.device("cpu"))
    gpu = load_artifact(path, torch.device("cuda"))
    images = np.concatenate([_examples(), np.random.default_rng(0).integers(0, 256, (54, 32, 32, 3), np.uint8)])
    x = _nchw(images)
    with torch.inference_mode():
        expected = cpu.module(x)
        got = gpu.module(x.cuda()).cpu()
        probs, feats = gpu.module.forward_with_features(x[:4].cuda(), list(gpu.module.layer_names))
    assert got.shape == expected.shape and torch.isfinite(got).all()
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    n = len(EXAMPLES)
    assert torch.equal(got[:n].argmax(1), expected[:n].argmax(1))
    for row in gpu.metadata["layers"]:
        assert feats[row["name"]].is_cuda and tuple(feats[row["name"]].shape) == (4, *row["output_shape"])


def test_server_on_cuda_classifies_like_the_cpu(tmp_path):
    config = make_config(ARTIFACTS, device="cuda", default_model=sorted(ARTIFACTS.glob("*.pt"))[0].stem,
                         metrics_port=0)
    server = RunningServer(config)
    try:
        with ClassifierClient(server.target) as client:
            assert client.health() == "SERVING"
            for info in client.list_models().models:
                cpu = torch.jit.load(str(ARTIFACTS / f"{info.name}.pt"), map_location="cpu").eval()
                images = _examples()
                with torch.inference_mode():
                    expected = cpu(_nchw(images)).numpy()
                results = client.classify(list(images), model=info.name, layers=["*"])
                got = np.stack([r.probabilities for r in results])
                np.testing.assert_allclose(got, expected, atol=ATOL)
                assert (got.argmax(1) == expected.argmax(1)).all()
                shapes = {layer.name: tuple(layer.output_shape) for layer in client.model_info(info.name).layers}
                assert {k: v.shape for k, v in results[0].feature_maps.items()} == shapes
                batch = client.classify([images[i % len(images)] for i in range(64)], model=info.name)
                assert [r.top_k[0].index for r in batch[: len(images)]] == list(expected.argmax(1))
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{server.app.metrics_port}/metrics", timeout=5).read()
        assert b'cifar10_gpu_memory_allocated_bytes{device="cuda:0"}' in metrics
    finally:
        server.stop()


def test_report_gpu(capsys):
    """Not a check: prints the device the figures above came from, for the log."""
    props = torch.cuda.get_device_properties(0)
    with capsys.disabled():
        print(json.dumps({"gpu": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
                          "torch": torch.__version__, "cuda": torch.version.cuda}))
