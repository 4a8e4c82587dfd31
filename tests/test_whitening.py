"""Issue 31: what the patch-whitening layer is fitted on, and which images the validation split holds.

The data loaders return the training images sorted by class, so "the first N training images" is
a few classes, not a sample; and the split was seeded by the training seed, so two training seeds
were scored on different images. Tiny widths and synthetic data, a few seconds on one CPU thread.
"""

from __future__ import annotations

import pytest
import torch

from cifar10_serving.model.checkpoint import load_checkpoint, save_checkpoint
from cifar10_serving.model.data import Dataset, validation_split
from cifar10_serving.model.export import load_scripted
from cifar10_serving.model.network import CifarNet, NetConfig, fit_whitening
from cifar10_serving.model.recipe import Recipe, whitening_fit_indices
from cifar10_serving.model.train import indices_sha256, main, train
from tests.helpers.models import TINY_WIDTHS
from tests.helpers.datasets import python_format_dataset, smooth_images

CLASSES = 10


def _class_sorted_labels(per_class: int) -> torch.Tensor:
    """Labels in the order both loaders return them: every airplane, then every automobile, ..."""
    return torch.arange(CLASSES).repeat_interleave(per_class)


def _assert_class_mixed(counts: list[int]) -> None:
    """Every class between 7% and 13% of the sample: a uniform draw lands there with a wide margin
    (at 5,000 images one class's standard deviation is 0.4%); a class-sorted prefix never does."""
    total = sum(counts)
    assert all(0.07 * total <= c <= 0.13 * total for c in counts), f"class counts of the whitening fit: {counts}"


def _no_training(**fields) -> Recipe:
    """Zero epochs: train() builds the split and prepares the fresh network (the whitening fit) and
    stops. Lookahead off because it needs at least one step."""
    return Recipe(**{"epochs": 0, "lookahead": False, "translate_px": 0, **fields})


def _dataset(per_class: int) -> Dataset:
    labels = _class_sorted_labels(per_class)
    return Dataset(smooth_images(len(labels)), labels, "synthetic, class-sorted", "0" * 64)


def _whitened_net() -> CifarNet:
    torch.manual_seed(0)
    return CifarNet(NetConfig(widths=TINY_WIDTHS, whiten=True))


# ----------------------------------------------------------------------------- the whitening fit
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_whitening_sample_of_the_class_sorted_training_set_is_class_mixed(seed):
    labels = _class_sorted_labels(5000)  # the real layout: 50,000 images, 500 a class held out
    train_idx, val_idx = validation_split(labels, per_class=500, seed=0)
    fit = whitening_fit_indices(train_idx, Recipe.whiten_fit_images, seed)
    assert len(fit) == len(set(fit.tolist())) == 5000
    assert not set(fit.tolist()) & set(val_idx.tolist())  # never a validation image
    _assert_class_mixed(torch.bincount(labels[fit], minlength=CLASSES).tolist())
    assert torch.equal(fit, whitening_fit_indices(train_idx, 5000, seed))  # seeded
    assert not torch.equal(fit, whitening_fit_indices(train_idx, 5000, seed + 1))
    assert torch.equal(whitening_fit_indices(train_idx[:100], 5000, seed), train_idx[:100])  # all, if fewer


def test_train_fits_the_whitening_layer_on_a_class_mixed_sample_and_records_it():
    data = _dataset(per_class=300)
    recipe = _no_training(val_per_class=30, whiten_fit_images=1000)
    net = _whitened_net()
    result = train(net, data, recipe, torch.device("cpu"), full=False, progress=False)

    fit = result["whitening_fit"]
    assert fit["images"] == sum(fit["class_counts"]) == 1000 and fit["seed"] == recipe.seed
    _assert_class_mixed(fit["class_counts"])  # a fit on train_idx[:1000] would be classes 0-3 only
    train_idx, _ = validation_split(data.labels, 30, recipe.split_seed)
    expected = _whitened_net()
    fit_whitening(expected, data.images[whitening_fit_indices(train_idx, 1000, recipe.seed)])
    assert torch.equal(net.stem.whiten.weight, expected.stem.whiten.weight)


# ----------------------------------------------------------------------------- the validation split
def _validation_sha256(data: Dataset, **fields) -> str:
    result = train(_whitened_net(), data, _no_training(val_per_class=5, **fields), torch.device("cpu"),
                   full=False, progress=False)
    return result["validation_indices_sha256"]


def test_two_training_seeds_are_scored_on_the_same_validation_images():
    data = _dataset(per_class=50)
    shipped = indices_sha256(validation_split(data.labels, 5, seed=0)[1])  # the shipped models' split
    assert _validation_sha256(data, seed=0) == _validation_sha256(data, seed=1) == _validation_sha256(data, seed=7)
    assert _validation_sha256(data, seed=1) == shipped


def test_the_split_seed_changes_the_validation_images():
    data = _dataset(per_class=50)
    assert _validation_sha256(data, split_seed=1) != _validation_sha256(data, split_seed=0)
    assert _validation_sha256(data, seed=5, split_seed=1) == indices_sha256(validation_split(data.labels, 5, 1)[1])


@pytest.mark.system  # a training run, one epoch
def test_the_exported_metadata_records_both_seeds_and_the_whitening_fit(tmp_path):
    root = python_format_dataset(tmp_path / "data", per_class=40)
    out = tmp_path / "m.pt"
    assert main(["--data", str(root), "--widths", "4,8,8", "--whiten", "--epochs", "1", "--batch-size", "64",
                 "--val-per-class", "5", "--whiten-fit-images", "120", "--seed", "3", "--threads", "1",
                 "--no-progress", "--out", str(out)]) == 0
    _, meta = load_scripted(out)
    assert meta["training"]["recipe"]["seed"] == 3 and meta["training"]["recipe"]["split_seed"] == 0
    assert meta["validation"]["split_seed"] == 0
    labels = _class_sorted_labels(40)  # the Python-format file written above is class-sorted too
    assert meta["validation"]["indices_sha256"] == indices_sha256(validation_split(labels, 5, 0)[1])
    fit = meta["training"]["whitening_fit"]
    assert fit["images"] == sum(fit["class_counts"]) == 120 and min(fit["class_counts"]) > 0 and fit["seed"] == 3


def test_resuming_a_checkpoint_from_before_the_split_seed_keeps_its_split(tmp_path):
    """Before issue 31 the split was seeded by --seed: such a checkpoint resumes only with that split."""
    root = python_format_dataset(tmp_path / "data", per_class=10)
    ckpt = tmp_path / "ckpt"
    common = ["--data", str(root), "--widths", "4,8,8", "--epochs", "2", "--batch-size", "64", "--val-per-class", "2",
              "--seed", "3", "--threads", "1", "--no-progress", "--checkpoint-dir", str(ckpt),
              "--out", str(tmp_path / "m.pt")]
    assert main([*common, "--split-seed", "3", "--stop-after", "1"]) == 0
    saved = load_checkpoint(ckpt)
    del saved["recipe"]["split_seed"], saved["whitening_fit"]  # as the code before issue 31 wrote it
    save_checkpoint(ckpt, saved)
    with pytest.raises(ValueError, match="another recipe"):  # --split-seed 0 would score other images
        main([*common, "--resume"])
    assert main([*common, "--split-seed", "3", "--resume"]) == 0
    assert load_checkpoint(ckpt)["epoch"] == 2
