"""The TorchServe handler of ``bench.peer``, run in-process as TorchServe's worker would call it (no
TorchServe or Java needed): it must answer what our server's own loading of the file answers, or the
side-by-side compares different work."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torchvision.io import decode_image

from bench.peer import Setting, parse_settings
from bench.torchserve_handler import Cifar10Handler
from cifar10_serving.server.models import load_artifact
from tests.helpers.images import encode, random_images


@pytest.fixture(scope="module")
def handler(tiny_models_dir):
    context = SimpleNamespace(system_properties={"model_dir": str(tiny_models_dir)},
                              manifest={"model": {"serializedFile": "tiny-max.pt"}},
                              # this process's own thread count, so the test leaves it as it was
                              model_yaml_config={"handler": {"torch_threads": torch.get_num_threads()}})
    h = Cifar10Handler()
    h.initialize(context)
    return h


def test_the_handler_answers_as_our_server_loads_the_file(handler, tiny_models_dir):
    arrays = random_images(5, seed=3)
    rows = ([{"data": encode(a, "PNG")} for a in arrays[:3]]
            + [{"body": encode(a, "JPEG", quality=95)} for a in arrays[3:]])
    answers = [json.loads(a) for a in handler.handle(rows, None)]
    ours = load_artifact(tiny_models_dir / "tiny-max.pt", torch.device("cpu"))
    # the images as the handler saw them (the JPEGs lossy), by the decoder both servers use
    pixels = torch.stack([decode_image(torch.frombuffer(bytearray(r.get("data") or r["body"]), dtype=torch.uint8))
                          for r in rows])
    with torch.inference_mode():
        expected = ours.module(pixels).numpy()
    assert len(answers) == 5
    np.testing.assert_allclose([a["probabilities"] for a in answers], expected, atol=1e-5)
    assert [a["label"] for a in answers] == [ours.class_names[i] for i in expected.argmax(axis=1)]
    assert all(a["probability"] == max(a["probabilities"]) for a in answers)


def test_the_handler_refuses_another_size(handler):
    with pytest.raises(ValueError, match="expected 32x32"):
        handler.handle([{"data": encode(random_images(1, size=16)[0], "PNG")}], None)
    with pytest.raises(ValueError, match="input key 'data'"):
        handler.handle([{"other": b""}], None)


def test_settings_parse_and_name():
    assert parse_settings("1/0,16/5") == [Setting(1, 0), Setting(16, 5)]
    assert [s.name for s in parse_settings("1/0,4/2")] == ["nobatch", "batch 4 / 2 ms"]
    with pytest.raises(ValueError, match="'0/2'"):
        parse_settings("0/2")
