"""The training recipe's pieces: its hyperparameters (``Recipe``), augmentation, the distillation
loss, the optimiser and learning-rate schedule, and what it does to a network before its first step
and at export. ``model.train`` runs them; each has its own test in tests/test_recipe.py.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from cifar10_serving.model.network import CIFAR10_MEAN, CifarNet, ResidualStage


# ----------------------------------------------------------------------------- hyperparameters
@dataclass(frozen=True)
class Recipe:
    """The defaults are airbench94's recipe (Keller Jordan's), written in PyTorch's own terms: its
    learning rate 11.5 and weight decay 0.0153 "per 1024 examples" on a summed loss are lr 1.5 and
    weight decay 1.33e-3 on the mean loss at batch 1024 with Nesterov momentum 0.85."""

    epochs: int = 10
    batch_size: int = 1024
    lr: float = 1.5  # peak SGD learning rate on the mean loss, reached after warmup_epochs
    warmup_epochs: float = 2.3  # linear ramp from lr_start * lr, then linear decay to lr_end * lr
    lr_start: float = 0.2
    lr_end: float = 0.07
    momentum: float = 0.85  # nesterov
    weight_decay: float = 1.33e-3  # every trained parameter, the same fraction per step (see make_optimizer)
    bias_lr_scale: float = 64.0  # BatchNorm biases learn this much faster (airbench's bias_scaler)
    frozen_bn_weights: bool = True  # BatchNorm's scales stay 1 (airbench); only its biases train
    bn_momentum: float = 0.4  # PyTorch's sense: the weight of the newest batch in the running statistics
    dirac: bool = True  # each 3x3 convolution starts as the identity on its first in_channels filters
    # "avg": a learned stride-2 downsampling convolution (--pool conv) starts as average pooling, each
    # filter the mean of its own channel's window; "random": PyTorch's default initialisation.
    downsample_init: str = "random"
    logit_scale: float = 1 / 9  # the fc output is scaled by this in training; folded into fc at export
    whiten_bias_epochs: int = 3  # the whitening layer's bias trains for these first epochs, then freezes
    # the whitening layer is fitted on a random sample of this many training images, as in airbench:
    # the 12 x 12 patch covariance is settled long before that
    whiten_fit_images: int = 5000
    lookahead: bool = True  # airbench's lookahead averaging every 5 steps (model/ema.py)
    label_smoothing: float = 0.2  # airbench's value: the net is small, the labels are hard
    translate_px: int = 2  # random shifts up to this many pixels, reflect-padded
    flip: bool = True  # horizontal flips
    alternate_flip: bool = True  # each image flipped at random once, then the other way every other epoch
    cutout: int = 0  # side of a square set to the mean colour at a random place in each image (0: off)
    val_per_class: int = 500  # 5,000 validation images in all
    seed: int = 0  # the training seed: initial weights, data order, augmentation, the whitening fit's sample
    # The validation split's own seed, so runs with different training seeds are scored on the same
    # images. 0, because the split was seeded by ``seed`` (default 0) before: every shipped model's split.
    split_seed: int = 0
    kd_weight: float = 0.0  # with a teacher: loss = (1 - w) * label loss + w * distillation loss
    kd_temperature: float = 4.0
    teacher_tta: bool = False  # the teacher's logits are the mean over the image and its mirror image
    ema_decay: float = 0.0  # 0: off; else the exported weights are an exponential moving average (model/ema.py)
    ema_every: int = 1  # optimizer steps between EMA updates


# ----------------------------------------------------------------------------- augmentation
def augment(padded: Tensor, idx: Tensor, recipe: Recipe, gen: torch.Generator, flip: Tensor | None = None) -> Tensor:
    """Random translate (crop from the reflect-padded images) and flip, on uint8, vectorised, on the
    device that holds ``padded`` (the random draws come from the CPU generator, so runs are seeded).
    ``flip``, if given, says which images to flip (alternating flips) instead of a coin per image."""
    pad, device = recipe.translate_px, padded.device
    n, size = len(idx), padded.shape[-1] - 2 * pad
    dy = torch.randint(0, 2 * pad + 1, (n, 1), generator=gen).to(device, non_blocking=True)
    dx = torch.randint(0, 2 * pad + 1, (n, 1), generator=gen).to(device, non_blocking=True)
    if flip is None:
        flip = torch.rand(n, generator=gen) < 0.5
    flip = flip.to(device, non_blocking=True)
    idx = idx.to(device, non_blocking=True)
    ar = torch.arange(size, device=device)
    rows, cols = (dy + ar)[:, None, :, None], (dx + ar)[:, None, None, :]
    out = padded[idx[:, None, None, None], torch.arange(3, device=device)[None, :, None, None], rows, cols]
    if recipe.flip:
        out = torch.where(flip[:, None, None, None], out.flip(3), out)
    if recipe.cutout:  # DeVries & Taylor: the square's centre is anywhere, so it may hang over the edge
        cy = torch.randint(0, size, (n, 1, 1), generator=gen).to(device, non_blocking=True)
        cx = torch.randint(0, size, (n, 1, 1), generator=gen).to(device, non_blocking=True)
        lo, hi = recipe.cutout // 2, (recipe.cutout + 1) // 2
        inside = ((ar[None, :, None] >= cy - lo) & (ar[None, :, None] < cy + hi)
                  & (ar[None, None, :] >= cx - lo) & (ar[None, None, :] < cx + hi))
        mean = torch.tensor(CIFAR10_MEAN, device=device).round().to(torch.uint8)[None, :, None, None]
        out = torch.where(inside[:, None], mean, out)
    return out


def reflect_pad(images: Tensor, pad: int) -> Tensor:
    return F.pad(images.float(), (pad,) * 4, mode="reflect").to(torch.uint8)


# ----------------------------------------------------------------------------- distillation
def distillation_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """Hinton et al.'s soft-target loss: KL(teacher || student) at a temperature, scaled by T^2."""
    t = temperature
    return F.kl_div(F.log_softmax(student_logits.float() / t, 1), F.log_softmax(teacher_logits.float() / t, 1),
                    reduction="batchmean", log_target=True) * (t * t)


# ----------------------------------------------------------------------------- training
def make_optimizer(net: CifarNet, recipe: Recipe) -> torch.optim.Optimizer:
    """Nesterov SGD in two groups: BatchNorm biases at ``bias_lr_scale`` times the learning rate, the
    rest at the learning rate. Weight decay takes the same fraction of every parameter per step
    (``lr * weight_decay``), so the faster group's decay is divided by its scale. Each group carries
    its ``lr_scale`` for the schedule. Frozen parameters (the whitening filters) stay out."""
    bn_biases = {id(m.bias) for m in net.modules() if isinstance(m, nn.BatchNorm2d)}
    trained = [p for p in net.parameters() if p.requires_grad]
    fast = [p for p in trained if id(p) in bn_biases]
    rest = [p for p in trained if id(p) not in bn_biases]
    scale = recipe.bias_lr_scale
    groups = [{"params": rest, "weight_decay": recipe.weight_decay, "lr_scale": 1.0},
              {"params": fast, "weight_decay": recipe.weight_decay / scale, "lr_scale": scale}]
    return torch.optim.SGD(groups, lr=recipe.lr, momentum=recipe.momentum, nesterov=True)


def lr_at(step: int, total: int, warmup: int, peak: float, start: float = 0.1, end: float = 0.0) -> float:
    """Linear from ``start * peak`` to ``peak`` over ``warmup`` steps, then linear to ``end * peak``."""
    if step < warmup:
        return peak * (start + (1 - start) * step / max(1, warmup))
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (1 - frac + end * frac)


def prepare_fresh(net: CifarNet, recipe: Recipe) -> None:
    """What the recipe does to a newly built network before its first step: dirac initialisation of
    the 3x3 convolutions (the first ``in_channels`` filters pass their input through unchanged), with
    ``downsample_init="avg"`` stride-2 convolutions that start as average pooling, and BatchNorm's
    settings. Not for fine-tuning, whose weights come from a file."""
    for module in net.modules():
        if recipe.dirac and isinstance(module, nn.Conv2d) and module.kernel_size == (3, 3) and module.stride == (1, 1):
            with torch.no_grad():
                w = module.weight
                nn.init.dirac_(w[: min(w.shape[0], w.shape[1])])
        if recipe.downsample_init == "avg" and isinstance(module, nn.Conv2d) and module.stride != (1, 1):
            with torch.no_grad():
                w = module.weight  # (out, in, k, k), out == in: downsampling keeps depth
                own = torch.arange(min(w.shape[0], w.shape[1]))
                w.zero_()[own, own] = 1.0 / (w.shape[2] * w.shape[3])
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = recipe.bn_momentum


def whitening_fit_indices(train_idx: Tensor, n: int, seed: int) -> Tensor:
    """A random sample of ``n`` of ``train_idx`` (all of them if fewer), sorted, for fitting the
    whitening layer. Random because the data loaders return the images sorted by class: the first
    5,000 training images were 4,500 airplanes and 500 automobiles (issue 31). Its own generator, so
    the draw moves none of the recipe's other random numbers; ``seed + 2`` because ``seed`` drives
    the data order and ``seed + 1`` the alternating flips."""
    gen = torch.Generator().manual_seed(seed + 2)
    return train_idx[torch.randperm(len(train_idx), generator=gen)[:n]].sort().values


def freeze_bn_weights(net: CifarNet, recipe: Recipe) -> None:
    """BatchNorm scales frozen, but for a residual stage's ``bn3``: it starts at zero (the branch
    silent) and is the branch's way to open, so it trains."""
    if recipe.frozen_bn_weights:
        gates = {id(m.bn3) for m in net.modules() if isinstance(m, ResidualStage)}
        for module in net.modules():
            if isinstance(module, nn.BatchNorm2d) and id(module) not in gates:
                module.weight.requires_grad_(False)


def fold_logit_scale(net: CifarNet, scale: float) -> CifarNet:
    """A copy of ``net`` whose fc layer computes ``scale`` times its logits: what the exported file holds."""
    folded = copy.deepcopy(net)
    if scale != 1.0:
        with torch.no_grad():
            folded.classifier.fc.weight.mul_(scale)
            folded.classifier.fc.bias.mul_(scale)
    return folded
