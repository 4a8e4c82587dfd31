"""The training recipe's building blocks: resume from a checkpoint, EMA weights, the frozen
patch-whitening layer (tiny widths, synthetic data, a few seconds on one CPU thread)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from cifar10_serving.model.checkpoint import CHECKPOINT_FILE, load_checkpoint, save_checkpoint
from cifar10_serving.model.ema import EMA, Lookahead
from cifar10_serving.model.export import build_metadata, export_torchscript, load_eager
from cifar10_serving.model.network import CifarNet, NetConfig, describe_layers, fit_whitening
from cifar10_serving.model.recipe import (Recipe, augment, fold_logit_scale, freeze_bn_weights, lr_at,
                                          make_optimizer, prepare_fresh, reflect_pad)
from cifar10_serving.model.train import main
from cifar10_serving.protos.artifact import METADATA_FILE
from tests.helpers.models import TINY_WIDTHS
from tests.helpers.datasets import python_format_dataset, smooth_images


@pytest.fixture
def deterministic():
    """One thread and deterministic kernels, so two runs over the same steps give the same bits."""
    threads, was = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(was)
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- resume
@pytest.mark.system  # a training run
@pytest.mark.parametrize("extra", [[], ["--whiten", "--ema", "0.8", "--ema-every", "2"]], ids=["plain", "whiten-ema"])
def test_stop_and_resume_gives_the_weights_of_an_uninterrupted_run(tmp_path, deterministic, extra):
    root = python_format_dataset(tmp_path / "data")
    common = ["--data", str(root), "--widths", "4,8,8", "--residual", "--epochs", "4", "--batch-size", "64",
              "--lr", "0.2", "--val-per-class", "5", "--threads", "1", "--no-progress", *extra]
    whole, pieces = tmp_path / "whole.pt", tmp_path / "pieces.pt"
    assert main([*common, "--out", str(whole)]) == 0
    ckpt = tmp_path / "ckpt"
    assert main([*common, "--checkpoint-dir", str(ckpt), "--stop-after", "2", "--out", str(pieces)]) == 0
    assert not pieces.exists()  # half a run exports nothing
    saved = load_checkpoint(ckpt)  # weights-only loadable
    assert saved["epoch"] == 2 and len(saved["history"]) == 2
    assert [p.name for p in ckpt.iterdir()] == [CHECKPOINT_FILE]  # the temporary file was renamed away
    assert main([*common, "--checkpoint-dir", str(ckpt), "--resume", "--out", str(pieces)]) == 0

    a, meta_a = load_eager(whole)
    b, meta_b = load_eager(pieces)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name
    assert meta_a["validation"]["accuracy"] == meta_b["validation"]["accuracy"]
    history = json.loads(pieces.with_suffix(".json").read_text())["history"]
    assert [row["epoch"] for row in history] == [1, 2, 3, 4]
    assert load_checkpoint(ckpt)["epoch"] == 4


def test_resume_refuses_a_checkpoint_of_another_recipe(tmp_path, deterministic):
    root = python_format_dataset(tmp_path / "data", per_class=10)
    common = ["--data", str(root), "--widths", "4,8,8", "--epochs", "2", "--batch-size", "64", "--val-per-class", "2",
              "--threads", "1", "--no-progress", "--checkpoint-dir", str(tmp_path / "ckpt"), "--out", str(tmp_path / "m.pt")]
    assert main([*common, "--stop-after", "1"]) == 0
    with pytest.raises(ValueError, match="another recipe"):
        main([*common, "--resume", "--lr", "0.1"])
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        main([*common[:-4], "--checkpoint-dir", str(tmp_path / "empty"), "--out", str(tmp_path / "m.pt"), "--resume"])


def test_resume_takes_a_checkpoint_written_before_a_recipe_field_existed(tmp_path, deterministic):
    root = python_format_dataset(tmp_path / "data", per_class=10)
    ckpt = tmp_path / "ckpt"
    common = ["--data", str(root), "--widths", "4,8,8", "--epochs", "2", "--batch-size", "64", "--val-per-class", "2",
              "--threads", "1", "--no-progress", "--checkpoint-dir", str(ckpt), "--out", str(tmp_path / "m.pt")]

    def as_an_older_version_wrote_it():
        saved = load_checkpoint(ckpt)
        del saved["recipe"]["downsample_init"]
        save_checkpoint(ckpt, saved)

    assert main([*common, "--stop-after", "1"]) == 0
    as_an_older_version_wrote_it()
    assert main([*common, "--resume"]) == 0  # the missing field counts as its default
    assert load_checkpoint(ckpt)["epoch"] == 2
    as_an_older_version_wrote_it()
    with pytest.raises(ValueError, match="another recipe"):  # but not as a value the old run never had
        main([*common, "--resume", "--downsample-init", "avg"])


def test_resume_without_a_checkpoint_dir_is_a_usage_error(tmp_path):
    with pytest.raises(SystemExit):
        main(["--resume", "--out", str(tmp_path / "m.pt")])


# ----------------------------------------------------------------------------- EMA
def test_ema_update_rule_by_hand():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    w0 = [p.detach().clone() for p in net.parameters()]
    ema = EMA(net, decay=0.75, every=2)
    w1 = [torch.randn_like(p) for p in w0]
    with torch.no_grad():
        for p, v in zip(net.parameters(), w1):
            p.copy_(v)
        net.train()(torch.randn(8, 2))  # moves BN's running statistics
    ema.update(net)  # step 1 of 2: nothing yet
    for avg, v in zip(ema.module.parameters(), w0):
        assert torch.equal(avg, v)
    ema.update(net)
    expected = [0.75 * a + 0.25 * b for a, b in zip(w0, w1)]
    for avg, v in zip(ema.module.parameters(), expected):
        torch.testing.assert_close(avg, v, rtol=0, atol=1e-6)
    for avg, b in zip(ema.module.buffers(), net.buffers()):  # buffers copied, not averaged
        assert torch.equal(avg, b)
    w2 = [torch.randn_like(p) for p in w0]
    with torch.no_grad():
        for p, v in zip(net.parameters(), w2):
            p.copy_(v)
    ema.update(net)
    ema.update(net)
    for avg, e, v in zip(ema.module.parameters(), expected, w2):
        torch.testing.assert_close(avg, 0.75 * e + 0.25 * v, rtol=0, atol=1e-6)
    assert not any(p.requires_grad for p in ema.module.parameters())


@pytest.mark.parametrize("decay,every", [(0.0, 1), (1.0, 1), (0.9, 0)])
def test_ema_bad_settings_raise_value_error(decay, every):
    with pytest.raises(ValueError, match="EMA"):
        EMA(nn.Linear(2, 2), decay, every)


# ----------------------------------------------------------------------------- lookahead
def test_lookahead_averages_and_resets_the_net_on_its_schedule():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    look = Lookahead(net, total_steps=10, every=5, base=0.9)
    start = {k: v.clone() for k, v in net.state_dict().items()}
    assert look.decay(0) == 0.0 and look.decay(10) == pytest.approx(0.9 ** 5)
    assert look.decay(5) == pytest.approx(0.9 ** 5 * 0.125)
    moved = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in start.items()}
    net.load_state_dict(moved)
    look.step(net, 4)  # not a multiple of every: nothing happens
    assert all(torch.equal(net.state_dict()[k], moved[k]) for k in moved)
    look.step(net, 5)
    d = 0.9 ** 5 * 0.125
    for k, v in net.state_dict().items():
        if v.is_floating_point():  # weights and BN statistics alike; the net now holds the average
            torch.testing.assert_close(v, d * start[k] + (1 - d) * moved[k], rtol=0, atol=1e-6)
            torch.testing.assert_close(look.average[k], v, rtol=0, atol=0)
        else:
            assert torch.equal(v, start[k])  # num_batches_tracked is left alone
    averaged = {k: v.clone() for k, v in look.average.items()}
    net.load_state_dict({**net.state_dict(), **{k: torch.randn_like(v) for k, v in averaged.items()}})
    look.finish(net)  # decay 1: the net ends on the average, the last weights discarded
    for k, v in averaged.items():
        assert torch.equal(net.state_dict()[k], v)


def test_lookahead_bad_settings_raise_value_error():
    with pytest.raises(ValueError, match="lookahead"):
        Lookahead(nn.Linear(2, 2), total_steps=0)


# ----------------------------------------------------------------------------- optimiser and schedule
def test_lr_schedule_ramps_from_start_to_peak_then_down_to_end():
    assert lr_at(0, 100, 23, 2.0, 0.2, 0.07) == pytest.approx(0.4)
    assert lr_at(23, 100, 23, 2.0, 0.2, 0.07) == pytest.approx(2.0)
    assert lr_at(100, 100, 23, 2.0, 0.2, 0.07) == pytest.approx(0.14)
    assert lr_at(0, 100, 0, 2.0, 0.2, 0.07) == pytest.approx(2.0)  # no warm-up: straight to the peak
    values = [lr_at(s, 100, 23, 2.0, 0.2, 0.07) for s in range(101)]
    assert values.index(max(values)) == 23


def test_bn_biases_learn_faster_with_the_same_decay_per_step_and_bn_weights_stay_frozen():
    net = CifarNet(NetConfig(widths=TINY_WIDTHS, whiten=True))
    recipe = Recipe(lr=0.5, weight_decay=1e-3, bias_lr_scale=64.0)
    freeze_bn_weights(net, recipe)
    opt = make_optimizer(net, recipe)
    rest, fast = opt.param_groups
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert {id(p) for p in fast["params"]} == {id(m.bias) for m in bns}
    assert not any(m.weight.requires_grad for m in bns)
    assert all(p is not m.weight for m in bns for g in opt.param_groups for p in g["params"])
    assert fast["lr_scale"] == 64.0 and rest["lr_scale"] == 1.0
    # SGD decays lr * weight_decay of a parameter per step: the same fraction in both groups
    assert fast["weight_decay"] * 64.0 * recipe.lr == pytest.approx(rest["weight_decay"] * recipe.lr)
    assert any(p is net.stem.whiten.bias for p in rest["params"])
    residual = CifarNet(NetConfig(widths=TINY_WIDTHS, residual=True))
    freeze_bn_weights(residual, recipe)  # a residual branch's bn3 starts at zero: frozen, it would never open
    assert all(stage.bn3.weight.requires_grad and not stage.bn1.weight.requires_grad for stage in residual.stages)


def test_dirac_init_makes_each_conv_pass_its_first_channels_through():
    torch.manual_seed(0)
    net = CifarNet(NetConfig(widths=(4, 8, 8)))
    prepare_fresh(net, Recipe())
    conv = net.stages.stage2.conv1  # 4 -> 8 channels: the first 4 filters are the identity
    x = torch.randn(2, 4, 6, 6)
    torch.testing.assert_close(conv(x)[:, :4], x)
    assert not torch.equal(conv(x)[:, 4:], torch.zeros(2, 4, 6, 6))  # the rest keep their random init
    square = net.stages.stage2.conv2  # 8 -> 8: all of it is the identity
    y = torch.randn(2, 8, 6, 6)
    torch.testing.assert_close(square(y), y)
    assert all(m.momentum == Recipe().bn_momentum for m in net.modules() if isinstance(m, nn.BatchNorm2d))


def test_a_stride_2_convolution_can_start_as_average_pooling():
    torch.manual_seed(0)
    net = CifarNet(NetConfig(widths=(4, 8, 8), pool="conv"))
    prepare_fresh(net, Recipe(downsample_init="avg"))
    down = net.stages.stage2.pool  # the learned 2x2 stride-2 convolution, 8 -> 8 channels
    x = torch.randn(2, 8, 6, 6)
    torch.testing.assert_close(down(x), F.avg_pool2d(x, 2, 2))
    prepare_fresh(fresh := CifarNet(NetConfig(widths=(4, 8, 8), pool="conv")), Recipe())
    assert not torch.allclose(fresh.stages.stage2.pool(x), F.avg_pool2d(x, 2, 2))  # the default keeps its random start


def test_folding_the_logit_scale_gives_the_scaled_softmax():
    torch.manual_seed(0)
    net = CifarNet(NetConfig(widths=TINY_WIDTHS)).eval()
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    folded = fold_logit_scale(net, 1 / 9)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), F.softmax(net.logits(x) / 9, 1))
        assert not torch.allclose(folded(x), net(x))  # the scale matters to the scores, not to their order


def test_alternating_flips_flip_each_image_the_other_way_in_the_next_epoch(tmp_path):
    padded = reflect_pad(smooth_images(6), 2)
    recipe = Recipe(translate_px=2)
    idx = torch.arange(6)
    coin = torch.tensor([True, False, True, True, False, False])
    odd = augment(padded, idx, recipe, torch.Generator().manual_seed(0), coin)
    even = augment(padded, idx, recipe, torch.Generator().manual_seed(0), ~coin)
    assert torch.equal(odd, even.flip(3))  # same crops (same draws), flipped the other way
    plain = augment(padded, idx, Recipe(translate_px=2, flip=False), torch.Generator().manual_seed(0))
    assert torch.equal(odd[coin], plain[coin].flip(3)) and torch.equal(odd[~coin], plain[~coin])


# ----------------------------------------------------------------------------- patch whitening
def _whitened_net(seed: int = 0) -> tuple[CifarNet, torch.Tensor]:
    torch.manual_seed(seed)
    net = CifarNet(NetConfig(widths=TINY_WIDTHS, residual=True, whiten=True))
    images = smooth_images(64)
    fit_whitening(net, images)
    return net, images


def test_whitening_layer_shapes_and_layer_table():
    net, images = _whitened_net()
    rows = {row["name"]: row for row in describe_layers(net)}
    assert list(rows)[:3] == ["stem.whiten", "stem.act", "stage1.conv1"]
    assert rows["stem.whiten"]["kind"] == "patch_whitening" and rows["stem.whiten"]["output_shape"] == [24, 31, 31]
    assert rows["stage1.pool"]["output_shape"] == [TINY_WIDTHS[0], 15, 15]
    probs, feats = net.eval().forward_with_features(images[:3], list(net.layer_names))
    assert probs.shape == (3, 10)
    for name, row in rows.items():
        assert tuple(feats[name].shape) == (3, *row["output_shape"]), name


def test_whitened_patches_have_identity_covariance_on_the_fitting_data():
    net, images = _whitened_net()
    with torch.no_grad():
        x = net.normalize(images)
        out = F.conv2d(x, net.stem.whiten.weight[:12])  # the first half; the second is its negative
    flat = out.permute(0, 2, 3, 1).reshape(-1, 12).double()
    cov = flat.T @ flat / len(flat)
    off_diagonal = cov - torch.diag(cov.diag())
    assert off_diagonal.abs().max() < 1e-4  # decorrelated exactly, up to float32 rounding
    # unit variance but for WHITEN_EPS, which shrinks a direction of variance v to v / (v + eps)
    assert 0.95 < cov.diag().min() and cov.diag().max() < 1.0 + 1e-4
    patches = x.unfold(2, 2, 1).unfold(3, 2, 1).permute(0, 2, 3, 1, 4, 5).reshape(-1, 12).double()
    raw = patches.T @ patches / len(patches)
    assert (raw - torch.eye(12, dtype=torch.float64)).abs().max() > 0.5  # the data was far from white
    torch.testing.assert_close(net.stem.whiten.weight[12:], -net.stem.whiten.weight[:12])


def test_whitening_weights_stay_frozen_through_a_training_step():
    net, images = _whitened_net()
    opt = make_optimizer(net, Recipe(lr=0.5))
    frozen = net.stem.whiten.weight
    assert not frozen.requires_grad
    assert all(p is not frozen for group in opt.param_groups for p in group["params"])
    before, conv_before = frozen.clone(), net.stages.stage1.conv1.weight.clone()
    net.train()
    loss = F.cross_entropy(net.logits(images[:16]), torch.arange(16) % 10)
    loss.backward()
    opt.step()
    assert torch.equal(frozen, before) and frozen.grad is None
    assert not torch.equal(net.stages.stage1.conv1.weight, conv_before)  # the rest did train


def test_whitened_net_scripted_equals_eager_and_round_trips(tmp_path):
    net, images = _whitened_net()
    net.eval()
    path = export_torchscript(net, tmp_path / "w.pt", build_metadata(net, "w", "test", validation=None))
    loaded = torch.jit.load(str(path))
    rebuilt, meta = load_eager(path)
    assert meta["architecture"]["whiten"] is True and not rebuilt.stem.whiten.weight.requires_grad
    with torch.no_grad():
        expected = net(images[:4])
        torch.testing.assert_close(torch.jit.script(net)(images[:4]), expected)
        torch.testing.assert_close(loaded(images[:4]), expected)
        torch.testing.assert_close(rebuilt.eval()(images[:4]), expected)


def test_files_written_before_the_whiten_field_still_load(tmp_path):
    torch.manual_seed(0)
    net = CifarNet(NetConfig(widths=TINY_WIDTHS)).eval()
    meta = build_metadata(net, "old", "1", validation=None)
    del meta["architecture"]["whiten"]  # what every file exported before this field existed says
    path = export_torchscript(net, tmp_path / "old.pt", meta)
    extra = {METADATA_FILE: ""}
    torch.jit.load(str(path), _extra_files=extra)
    assert "whiten" not in json.loads(extra[METADATA_FILE])["architecture"]
    rebuilt, _ = load_eager(path)
    assert rebuilt.config.whiten is False and len(rebuilt.stem) == 0
    x = smooth_images(2)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(x), net(x))


def test_shipped_artifacts_still_load():
    shipped = sorted((Path(__file__).resolve().parent.parent / "model" / "artifacts").glob("*.pt"))
    if not shipped:
        pytest.skip("no shipped artifacts in this checkout")
    for path in shipped:
        net, meta = load_eager(path)
        assert net.config.whiten is meta["architecture"].get("whiten", False), path.name
        assert [r["name"] for r in describe_layers(net)] == [r["name"] for r in meta["layers"]], path.name


@pytest.mark.parametrize("pool, kind", [("max", "maxpool"), ("avg", "avgpool"), ("conv", "conv_downsample")])
def test_figures_show_every_downsampling_layer_halving_width_and_keeping_depth(tmp_path, pool, kind):
    from cifar10_serving.model.figures import downsampling_layers, feature_maps, picture
    from tests.helpers.models import export_tiny

    path = export_tiny(tmp_path, f"tiny-{pool}", pool=pool)
    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    metadata, maps, probs = feature_maps(path, image)
    rows = downsampling_layers(metadata)
    assert [row["kind"] for row in rows] == [kind] * len(TINY_WIDTHS)
    sizes = [maps[row["name"]].shape for row in rows]
    assert sizes == [(width, 32 >> (i + 1), 32 >> (i + 1)) for i, width in enumerate(TINY_WIDTHS)]
    assert probs.shape == (10,) and abs(float(probs.sum()) - 1) < 1e-5
    canvas, _ = picture(path, image, channels=2)
    assert canvas.height > len(rows) * 96  # one row of maps per downsampling layer
