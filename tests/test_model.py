"""The network, its export, the data loaders and the trainer (tiny widths, synthetic data)."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import tarfile
import io
from pathlib import Path

import numpy as np
import pytest
import torch

from cifar10_serving.model.data import CLASSES, PYTHON_FORMAT_DIR, load_jpeg_archive, load_python_format, validation_split
from cifar10_serving.model.network import CifarNet, NetConfig, count_flops, describe_layers, pooled_size
from cifar10_serving.protos.artifact import METADATA_FILE
from tests.helpers.images import encode
from tests.helpers.models import TINY_WIDTHS, export_tiny

CONFIGS = [(pool, size) for pool in ("max", "avg", "conv") for size in (2, 3)]
RESIDUAL = [False, True]


def _load(path: Path):
    extra = {METADATA_FILE: ""}
    module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    return module, json.loads(extra[METADATA_FILE])


def _images(n: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("residual", RESIDUAL)
@pytest.mark.parametrize("pool,pool_size", CONFIGS)
def test_scripted_equals_eager_before_and_after_save(tmp_path, pool, pool_size, residual):
    path = export_tiny(tmp_path, f"m-{pool}{pool_size}", pool=pool, pool_size=pool_size, residual=residual)
    torch.manual_seed(0)
    eager = CifarNet(NetConfig(pool=pool, pool_size=pool_size, widths=TINY_WIDTHS, residual=residual))
    eager.load_state_dict(torch.jit.load(str(path)).state_dict())
    eager.eval()
    scripted = torch.jit.script(eager)
    loaded, _ = _load(path)
    x = _images()
    with torch.no_grad():
        expected = eager(x)
        torch.testing.assert_close(scripted(x), expected)
        torch.testing.assert_close(loaded(x), expected)
        probs, _ = loaded.forward_with_features(x, [])
        torch.testing.assert_close(probs, expected)
    torch.testing.assert_close(expected.sum(1), torch.ones(len(x)))


@pytest.mark.parametrize("residual", RESIDUAL)
@pytest.mark.parametrize("pool,pool_size", CONFIGS)
def test_pooling_follows_formula_and_keeps_depth(tmp_path, pool, pool_size, residual):
    module, meta = _load(export_tiny(tmp_path, "m", pool=pool, pool_size=pool_size, residual=residual))
    layers = module.layer_names
    _, feats = module.forward_with_features(_images(2), layers)
    pools = [i for i, row in enumerate(meta["layers"]) if row["name"].startswith("stage") and row["name"].endswith(".pool")]
    assert len(pools) == len(TINY_WIDTHS)
    for i in pools:
        before, after = feats[layers[i - 1]], feats[layers[i]]
        c, h, w = before.shape[1:]
        assert after.shape[1:] == (c, pooled_size(h, pool_size), pooled_size(w, pool_size))
        assert after.shape[2] == (h - pool_size) // 2 + 1
    assert meta["pooling"] == {"kind": pool, "window": pool_size, "stride": 2, "padding": 0}


def test_max_pool_keeps_the_strongest_response_and_avg_the_mean(tmp_path):
    x = _images(2)
    for pool, reduce in (("max", torch.amax), ("avg", torch.mean)):
        module, _ = _load(export_tiny(tmp_path, pool, pool=pool))
        _, feats = module.forward_with_features(x, ["stage1.conv1", "stage1.pool"])
        conv = feats["stage1.conv1"]
        windows = conv.unfold(2, 2, 2).unfold(3, 2, 2)  # N, C, 16, 16, 2, 2
        torch.testing.assert_close(feats["stage1.pool"], reduce(windows, dim=(-1, -2)))


@pytest.mark.parametrize("residual", RESIDUAL)
def test_every_metadata_layer_is_a_feature_map_of_the_stated_shape(tmp_path, residual):
    module, meta = _load(export_tiny(tmp_path, "m", pool="avg", pool_size=3, residual=residual))
    names = [row["name"] for row in meta["layers"]]
    assert names == list(module.layer_names)
    assert names[-1] == "classifier.fc" and "head.flatten" in names
    probs, feats = module.forward_with_features(_images(3), names)
    for row in meta["layers"]:
        assert tuple(feats[row["name"]].shape) == (3, *row["output_shape"]), row["name"]
    torch.testing.assert_close(probs, torch.softmax(feats["classifier.fc"], 1))
    with pytest.raises(Exception, match="unknown layer"):
        module.forward_with_features(_images(1), ["nope"])


def test_metadata_describes_the_model(tmp_path):
    _, meta = _load(export_tiny(tmp_path, "named", pool="max"))
    assert meta["name"] == "named" and meta["class_names"] == list(CLASSES)
    assert meta["input"]["dtype"] == "uint8" and meta["input"]["shape"] == [-1, 3, 32, 32]
    assert meta["flops_per_image"] == sum(row["flops"] for row in meta["layers"]) > 0
    assert meta["torch_version"] == torch.__version__


def test_flops_of_the_default_architecture_are_within_budget():
    from cifar10_serving.model.train import ARCHS

    widths, residual, whiten = ARCHS["base"]
    net = CifarNet(NetConfig(widths=widths, residual=residual, whiten=whiten))
    assert count_flops(net) <= 150e6
    rows = describe_layers(net)
    # the whitening conv: 3 -> 24 channels, 2x2, no padding, at 31x31; then conv1 of stage1: 24 ->
    # widths[0] channels, 3x3, at 31x31; multiply-adds x 2
    assert whiten and rows[0]["flops"] == 2 * 3 * 24 * 4 * 31 * 31
    assert rows[2]["name"] == "stage1.conv1" and rows[2]["flops"] == 2 * 24 * widths[0] * 9 * 31 * 31


def test_residual_stage_adds_act1_back_after_act3(tmp_path):
    module, meta = _load(export_tiny(tmp_path, "r", residual=True))
    names = ["stage2.act1", "stage2.act3", "stage2.add", "stage3.conv1"]
    _, feats = module.forward_with_features(_images(2), names)
    torch.testing.assert_close(feats["stage2.add"], feats["stage2.act1"] + feats["stage2.act3"])
    kinds = {row["name"]: row["kind"] for row in meta["layers"]}
    assert kinds["stage2.add"] == "residual_add" and kinds["stage2.conv3"] == "conv"
    assert meta["architecture"]["residual"] is True


@pytest.mark.parametrize("kwargs,word", [
    ({"pool": "median"}, "median"), ({"pool_size": 4}, "4"), ({"widths": ()}, "widths"),
    ({"widths": (8, 0)}, "widths"), ({"num_classes": 1}, "1"),
    ({"widths": (4,) * 5, "pool_size": 3}, "shrink"),
])
def test_bad_configs_raise_value_error_naming_the_value(kwargs, word):
    with pytest.raises(ValueError, match=word):
        NetConfig(**kwargs)


def test_loads_without_the_model_package(tmp_path):
    path = export_tiny(tmp_path, "standalone")
    code = (
        "import sys, json, torch\n"
        "extra = {'metadata.json': ''}\n"
        f"m = torch.jit.load({str(path)!r}, map_location='cpu', _extra_files=extra)\n"
        "assert 'model' not in sys.modules and not any(k.startswith('model.') for k in sys.modules)\n"
        "p = m(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))\n"
        "print(json.loads(extra['metadata.json'])['name'], tuple(p.shape))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["standalone", "(2,", "10)"]


# ----------------------------------------------------------------------------- data
def _synthetic(n_per_class: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Images whose class shows in their colour, so a tiny net can learn them."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(10), n_per_class)
    base = rng.integers(0, 256, (10, 3), dtype=np.int64)
    noise = rng.integers(-40, 41, (len(labels), 3, 32, 32))
    images = np.clip(base[labels][:, :, None, None] + noise, 0, 255).astype(np.uint8)
    return images, labels


def _write_python_format(root: Path, images: np.ndarray, labels: np.ndarray) -> Path:
    folder = root / PYTHON_FORMAT_DIR
    folder.mkdir(parents=True)
    for i, (chunk, lab) in enumerate(zip(np.array_split(images, 5), np.array_split(labels, 5)), start=1):
        with open(folder / f"data_batch_{i}", "wb") as f:
            pickle.dump({b"data": chunk.reshape(len(chunk), -1), b"labels": lab.tolist()}, f)
    return root


def test_jpeg_archive_and_python_format_give_the_same_layout_and_labels(tmp_path):
    images, labels = _synthetic(3)
    archive = tmp_path / "train.tar.gz"
    decoded = []
    with tarfile.open(archive, "w:gz") as tar:
        for i, (img, lab) in enumerate(zip(images, labels)):
            data = encode(img.transpose(1, 2, 0), "JPEG", quality=95)
            info = tarfile.TarInfo(f"train/{CLASSES[lab]}/{i:04d}.jpg")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
            from PIL import Image
            decoded.append(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).transpose(2, 0, 1))
    jpeg = load_jpeg_archive(archive)
    python = load_python_format(_write_python_format(tmp_path / "py", np.stack(decoded), labels))
    assert jpeg.images.dtype == python.images.dtype == torch.uint8
    assert jpeg.images.shape == python.images.shape == (30, 3, 32, 32)
    assert torch.equal(jpeg.labels, python.labels)
    # libjpeg and PIL may differ by a rounding step in colour conversion, never more
    assert (jpeg.images.int() - python.images.int()).abs().max() <= 2
    assert len(jpeg.sha256) == len(python.sha256) == 64


def test_validation_split_is_fixed_balanced_and_disjoint():
    labels = torch.arange(10).repeat_interleave(50)
    train_a, val_a = validation_split(labels, per_class=5, seed=0)
    train_b, val_b = validation_split(labels, per_class=5, seed=0)
    assert torch.equal(val_a, val_b) and torch.equal(train_a, train_b)
    assert torch.bincount(labels[val_a]).tolist() == [5] * 10
    assert len(set(train_a.tolist()) & set(val_a.tolist())) == 0 and len(train_a) + len(val_a) == 500
    assert not torch.equal(validation_split(labels, per_class=5, seed=1)[1], val_a)


@pytest.mark.system  # a training run
def test_tiny_training_run_lowers_the_loss_and_exports_a_loadable_file(tmp_path):
    images, labels = _synthetic(40)
    root = _write_python_format(tmp_path / "data", images, labels)
    out = tmp_path / "trained.pt"
    from cifar10_serving.model.train import main

    argv = ["--data", str(root), "--widths", "4,8,8", "--epochs", "3", "--batch-size", "64", "--lr", "0.2",
            "--val-per-class", "5", "--threads", "1", "--no-progress", "--out", str(out)]
    assert main(argv) == 0
    metrics = json.loads(out.with_suffix(".json").read_text())
    losses = [row["loss"] for row in metrics["history"]]
    assert losses[-1] < losses[0]
    module, meta = _load(out)
    assert meta["name"] == "trained" and meta["dataset"]["source"] == "cifar10-python"
    assert meta["validation"]["images"] == 50
    assert meta["training"]["recipe"]["epochs"] == 3
    # the metadata's accuracy is what re-running the evaluation on the same split reproduces
    _, val_idx = validation_split(torch.from_numpy(labels), per_class=5, seed=0)
    with torch.no_grad():
        pred = module(torch.from_numpy(images[val_idx.numpy()])).argmax(1)
    assert pred.eq(torch.from_numpy(labels[val_idx.numpy()])).float().mean().item() == pytest.approx(
        meta["validation"]["accuracy"])

    # a residual student distilled from that model: trains, and its metadata names its teacher
    student = tmp_path / "student.pt"
    argv = ["--data", str(root), "--widths", "4,8,8", "--residual", "--teacher", str(out), "--kd-weight", "0.5",
            "--epochs", "2", "--batch-size", "64", "--val-per-class", "5", "--threads", "1", "--no-progress",
            "--out", str(student)]
    assert main(argv) == 0
    _, meta = _load(student)
    assert meta["architecture"]["residual"] is True
    assert meta["training"]["teacher"]["name"] == "trained" and meta["training"]["recipe"]["kd_weight"] == 0.5

    # fine-tuning that model from its own weights, taught by its flip-TTA scores: the architecture comes
    # from the file (the --widths given here are overridden), the first epoch starts from its weights
    tuned = tmp_path / "tuned.pt"
    argv = ["--data", str(root), "--widths", "16,16,16", "--init", str(out), "--teacher", str(out), "--teacher-tta",
            "--kd-weight", "0.5", "--epochs", "1", "--lr", "0.0", "--warmup-epochs", "0", "--batch-size", "64",
            "--val-per-class", "5", "--threads", "1", "--no-progress", "--out", str(tuned)]
    assert main(argv) == 0
    tuned_module, meta = _load(tuned)
    assert meta["architecture"]["widths"] == [4, 8, 8] and meta["training"]["init"]["name"] == "trained"
    assert meta["training"]["recipe"]["teacher_tta"] is True and meta["training"]["recipe"]["warmup_epochs"] == 0
    # at learning rate 0 the weights are the initial ones; only BatchNorm's running statistics moved
    tuned_state, start_state = tuned_module.state_dict(), module.state_dict()
    for name, value in start_state.items():
        if "running_" not in name and "num_batches" not in name:
            assert torch.equal(tuned_state[name], value), name


@pytest.mark.parametrize("pool_size", [2, 3])
def test_conv_downsampling_is_a_learned_strided_conv_named_in_the_layer_table(tmp_path, pool_size):
    module, meta = _load(export_tiny(tmp_path, "c", pool="conv", pool_size=pool_size, residual=True))
    rows = {row["name"]: row for row in meta["layers"]}
    for i, width in enumerate(TINY_WIDTHS, start=1):
        row = rows[f"stage{i}.pool"]
        assert row["kind"] == "conv_downsample" and (row["kernel"], row["stride"], row["padding"]) == (pool_size, 2, 0)
        assert row["flops"] == 2 * width * width * pool_size ** 2 * row["output_shape"][1] * row["output_shape"][2]
        weight = module.state_dict()[f"stages.stage{i}.pool.weight"]
        assert tuple(weight.shape) == (width, width, pool_size, pool_size)  # depth unchanged, learned
    # against the pooled network of the same widths: the extra parameters are exactly those filters
    _, pooled = _load(export_tiny(tmp_path, "m", pool="max", pool_size=pool_size, residual=True))
    assert meta["parameters"] - pooled["parameters"] == sum(w * w * pool_size ** 2 for w in TINY_WIDTHS)
