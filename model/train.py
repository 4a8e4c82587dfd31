"""Train a CifarNet on CIFAR-10 and export it as a self-describing TorchScript file.

    python -m model.train --pool max --out model/artifacts/base-max.pt

Reads the JPEG archive (``--data path/train.tar.gz``) or the standard Python format (``--data DIR``,
add ``--download`` to fetch it). Holds out a fixed validation split of 500 images per class for
model selection, seeded by ``--split-seed``, not by the training ``--seed``, so runs with different
training seeds are scored on the same images (``--full`` trains on all 50,000 instead and reports
no validation figure).
Uses the GPU with bf16 autocast when there is one, the CPU otherwise.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
from torch.nn import functional as F

from cifar10_serving.model.checkpoint import load_checkpoint, rng_states, save_checkpoint, set_rng_states
from cifar10_serving.model.data import DEFAULT_DATA, Dataset, load_training_set, validation_split
from cifar10_serving.model.ema import EMA, Lookahead
from cifar10_serving.model.evaluate import autocast, evaluate
from cifar10_serving.model.export import build_metadata, export_torchscript, load_eager
from cifar10_serving.model.network import CifarNet, NetConfig, fit_whitening
from cifar10_serving.model.recipe import (Recipe, augment, distillation_loss, fold_logit_scale, freeze_bn_weights,
                                          lr_at, make_optimizer, prepare_fresh, reflect_pad, whitening_fit_indices)

log = logging.getLogger("model.train")

ARCHS = {  # named (widths, residual, whiten) plans; "base" is the <=150 MFLOP default
    "small": ((32, 64, 128), False, False),  # 35 MFLOP per image
    "plain": ((64, 128, 256), False, False),  # 136 MFLOP per image
    "base": ((64, 176, 176), False, True),  # 149 MFLOP per image: airbench94's network, narrowed from 256
    "residual": ((32, 128, 256), True, False),  # 143 MFLOP per image: the base plan of model versions 1-2
    "large": ((128, 256, 512), True, False),  # 762 MFLOP per image, for GPU serving
}


# ----------------------------------------------------------------------------- training
def train(net: CifarNet, data: Dataset, recipe: Recipe, device: torch.device, full: bool, progress: bool,
          teacher: CifarNet | None = None, fresh: bool = True, checkpoint_dir: str | Path | None = None,
          resume: bool = False, stop_after: int | None = None) -> dict:
    """Trains ``net`` in place. ``fresh``: a new network (dirac init, whitening fitted, the logit scale
    applied); False for fine-tuning a file's weights. With ``checkpoint_dir`` saves a checkpoint after
    every epoch; ``resume`` continues from the last one there; ``stop_after`` ends the run after that
    epoch (training in pieces). ``net`` ends holding the weights to export (averaged with EMA on, the
    logit scale folded into fc)."""
    torch.manual_seed(recipe.seed)
    gen = torch.Generator().manual_seed(recipe.seed)
    train_idx, val_idx = validation_split(data.labels, recipe.val_per_class, recipe.split_seed)
    if full:
        train_idx = torch.arange(len(data.labels))
    padded = reflect_pad(data.images, recipe.translate_px).to(device)  # 150 MB on the GPU: augment there
    labels = data.labels.to(device)
    net.to(device, memory_format=torch.channels_last)
    scale = recipe.logit_scale if fresh else 1.0  # a file's fc has its scale folded in already
    whitening_fit = None  # what the whitening layer was fitted on, for the metadata (None: not fitted here)
    if fresh:
        prepare_fresh(net, recipe)
        if net.config.whiten:
            fit_idx = whitening_fit_indices(train_idx, recipe.whiten_fit_images, recipe.seed)
            fit_whitening(net, data.images[fit_idx])  # un-augmented training images only
            whitening_fit = {"images": len(fit_idx), "sample": "random", "seed": recipe.seed, "class_counts":
                             torch.bincount(data.labels[fit_idx], minlength=net.config.num_classes).tolist()}
    freeze_bn_weights(net, recipe)
    opt = make_optimizer(net, recipe)
    ema = EMA(net, recipe.ema_decay, recipe.ema_every) if recipe.ema_decay else None
    steps_per_epoch = (len(train_idx) + recipe.batch_size - 1) // recipe.batch_size
    total, warmup = recipe.epochs * steps_per_epoch, int(recipe.warmup_epochs * steps_per_epoch)
    lookahead = Lookahead(net, total) if recipe.lookahead else None
    # alternating flips: a fixed coin per image (its own seeded generator, so resuming needs no state),
    # the image flipped that way in odd epochs and the other way in even ones
    first_flip = torch.rand(len(data.labels), generator=torch.Generator().manual_seed(recipe.seed + 1)) < 0.5
    history, step, t_train, first_epoch = [], 0, 0.0, 1
    saved = load_checkpoint(checkpoint_dir) if resume and checkpoint_dir is not None else None
    if resume and saved is None:
        raise FileNotFoundError(f"--resume: no checkpoint in {checkpoint_dir}")
    if saved is not None:
        # A field added to Recipe after the checkpoint was written counts as its default, but for
        # split_seed: before it existed the split was seeded by the training seed.
        written = {**asdict(Recipe()), "split_seed": saved["recipe"]["seed"], **saved["recipe"]}
        if written != asdict(recipe) or saved["config"] != net.config.to_dict() or saved["full"] != full:
            raise ValueError(f"{checkpoint_dir}: the checkpoint was written by a run with another recipe, network "
                             f"or split; resume with the same flags (checkpoint recipe: {saved['recipe']})")
        net.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        if ema is not None:
            ema.load_state_dict(saved["ema"])
        if lookahead is not None:
            lookahead.load_state_dict(saved["lookahead"])
        gen.set_state(saved["data_generator"])
        set_rng_states(saved["rng"])
        history, step, t_train, first_epoch = saved["history"], saved["step"], saved["train_seconds"], saved["epoch"] + 1
        whitening_fit = saved.get("whitening_fit")  # the checkpoint's weights are what was fitted then
        log.info("resumed from %s after epoch %d (step %d)", checkpoint_dir, saved["epoch"], step)
    for epoch in range(first_epoch, recipe.epochs + 1):
        net.train()
        if fresh and net.config.whiten:
            net.stem.whiten.bias.requires_grad_(epoch <= recipe.whiten_bias_epochs)
        flips = (first_flip if epoch % 2 else ~first_flip) if recipe.flip and recipe.alternate_flip else None
        t0 = time.perf_counter()
        perm = train_idx[torch.randperm(len(train_idx), generator=gen)]
        batches = perm.split(recipe.batch_size)
        if progress:
            from tqdm import tqdm

            batches = tqdm(batches, desc=f"epoch {epoch}/{recipe.epochs}", leave=False, file=sys.stderr)
        loss_sum = torch.zeros((), device=device)
        for idx in batches:
            x = augment(padded, idx, recipe, gen, None if flips is None else flips[idx])
            x = x.contiguous(memory_format=torch.channels_last)
            y = labels[idx.to(device, non_blocking=True)]
            lr = lr_at(step, total, warmup, recipe.lr, recipe.lr_start, recipe.lr_end)
            for group in opt.param_groups:
                group["lr"] = lr * group["lr_scale"]
            with autocast(device):
                logits = net.logits(x) * scale
                loss = F.cross_entropy(logits, y, label_smoothing=recipe.label_smoothing)
                if teacher is not None:
                    with torch.no_grad():
                        teacher_logits = teacher.logits(x)
                        if recipe.teacher_tta:
                            teacher_logits = (teacher_logits + teacher.logits(x.flip(3))) / 2
                    kd = distillation_loss(logits, teacher_logits, recipe.kd_temperature)
                    loss = (1 - recipe.kd_weight) * loss + recipe.kd_weight * kd
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if lookahead is not None:
                lookahead.step(net, step)
                if step == total:
                    lookahead.finish(net)
            if ema is not None:
                ema.update(net)
            loss_sum += loss.detach() * len(idx)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        t_train += seconds
        row = {"epoch": epoch, "loss": loss_sum.item() / len(train_idx), "seconds": seconds,
               "images_per_second": len(train_idx) / seconds}
        if not full:
            exact = epoch == recipe.epochs  # the last line is the figure the metadata records
            scored = fold_logit_scale(net if ema is None else ema.module, scale)  # the weights to export
            row.update(evaluate(scored, data.images[val_idx], data.labels[val_idx], device, exact=exact))
        history.append(row)
        val = f" val {100 * row['accuracy']:.2f}% (flip-TTA {100 * row['accuracy_flip_tta']:.2f}%)" if not full else ""
        log.info("epoch %d/%d loss %.4f%s %.0f img/s %.1fs", epoch, recipe.epochs, row["loss"], val,
                 row["images_per_second"], seconds)
        if checkpoint_dir is not None:
            save_checkpoint(checkpoint_dir, {
                "epoch": epoch, "step": step, "history": history, "train_seconds": t_train,
                "recipe": asdict(recipe), "config": net.config.to_dict(), "full": full, "whitening_fit": whitening_fit,
                "model": net.state_dict(), "optimizer": opt.state_dict(),
                "ema": None if ema is None else ema.state_dict(),
                "lookahead": None if lookahead is None else lookahead.state_dict(),
                "data_generator": gen.get_state(), "rng": rng_states()})
        if stop_after is not None and epoch >= stop_after and epoch < recipe.epochs:
            log.info("stopped after epoch %d of %d; continue with --resume", epoch, recipe.epochs)
            break
    net.load_state_dict(fold_logit_scale(net if ema is None else ema.module, scale).state_dict())
    return {"finished": history[-1]["epoch"] == recipe.epochs if history else False,
            "history": history, "train_seconds": t_train, "train_images": len(train_idx),
            "validation_images": 0 if full else len(val_idx),
            "validation_indices_sha256": None if full else indices_sha256(val_idx), "whitening_fit": whitening_fit}


def indices_sha256(idx: torch.Tensor) -> str:
    """A fingerprint of a set of image indices (sorted, int64 little-endian): two files whose
    validation carries the same one were scored on the same images of the same data set."""
    return hashlib.sha256(idx.sort().values.to(torch.int64).numpy().astype("<i8").tobytes()).hexdigest()


def teacher_note(meta: dict | None) -> dict | None:
    if meta is None:
        return None
    return {"name": meta["name"], "architecture": meta["architecture"], "flops_per_image": meta["flops_per_image"],
            "validation_accuracy": meta.get("validation", {}).get("accuracy")}


def init_note(meta: dict | None) -> dict | None:
    """What a fine-tuned model started from: that model's name, version, validation and whole training record."""
    if meta is None:
        return None
    return {"name": meta["name"], "version": meta["version"], "validation": meta.get("validation"),
            "training": meta.get("training")}


def hardware(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    except OSError:
        pass
    return f"{name} CPU, {torch.get_num_threads()} threads"


# ----------------------------------------------------------------------------- command line
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m model.train", description=__doc__.split("\n")[0])
    p.add_argument("--data", default=str(DEFAULT_DATA), help="JPEG .tar.gz archive or CIFAR-10 Python-format folder")
    p.add_argument("--download", action="store_true", help="download the Python format into --data if missing")
    p.add_argument("--cache-dir", default=None, help="cache decoded JPEGs here (a .pt file)")
    p.add_argument("--pool", default="max", help="max, avg or conv (stride-2 convolution)")
    p.add_argument("--pool-size", type=int, default=2, help="2 (non-overlapping) or 3 (overlapping)")
    p.add_argument("--arch", default="base", choices=sorted(ARCHS), help="width plan")
    p.add_argument("--widths", default=None, help="comma-separated widths; overrides --arch")
    p.add_argument("--residual", action=argparse.BooleanOptionalAction, default=None,
                   help="residual stages (conv3 and a skip connection); default: the arch's")
    p.add_argument("--whiten", action=argparse.BooleanOptionalAction, default=None,
                   help="a frozen 2x2 patch-whitening first layer, fitted to the training images (airbench); "
                        "default: the arch's")
    p.add_argument("--ema", type=float, default=Recipe.ema_decay, metavar="DECAY",
                   help="export an exponential moving average of the weights with this decay per update (0: off)")
    p.add_argument("--ema-every", type=int, default=Recipe.ema_every, metavar="STEPS", help="steps between EMA updates")
    p.add_argument("--checkpoint-dir", default=None, help="save a checkpoint here after every epoch")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --checkpoint-dir")
    p.add_argument("--stop-after", type=int, default=None, metavar="EPOCHS",
                   help="stop after this epoch (with --checkpoint-dir; train the rest later with --resume)")
    p.add_argument("--teacher", default=None, help="exported model to distil from (knowledge distillation)")
    p.add_argument("--kd-weight", type=float, default=0.9, help="weight of the distillation loss, with --teacher")
    p.add_argument("--kd-temperature", type=float, default=Recipe.kd_temperature)
    p.add_argument("--teacher-tta", action="store_true",
                   help="the teacher scores each image and its mirror image (flip TTA) and teaches their mean")
    p.add_argument("--init", default=None,
                   help="start from the weights of this exported model (fine-tuning); its architecture is used")
    p.add_argument("--epochs", type=int, default=Recipe.epochs)
    p.add_argument("--batch-size", type=int, default=Recipe.batch_size)
    p.add_argument("--lr", type=float, default=Recipe.lr)
    p.add_argument("--warmup-epochs", type=float, default=Recipe.warmup_epochs, help="linear warm-up of the learning rate")
    p.add_argument("--lr-start", type=float, default=Recipe.lr_start, help="learning rate at step 0, as a fraction of --lr")
    p.add_argument("--lr-end", type=float, default=Recipe.lr_end, help="learning rate at the last step, as a fraction of --lr")
    p.add_argument("--momentum", type=float, default=Recipe.momentum, help="Nesterov momentum")
    p.add_argument("--weight-decay", type=float, default=Recipe.weight_decay)
    p.add_argument("--bias-lr-scale", type=float, default=Recipe.bias_lr_scale,
                   help="BatchNorm biases learn this many times faster")
    p.add_argument("--frozen-bn-weights", action=argparse.BooleanOptionalAction, default=Recipe.frozen_bn_weights,
                   help="BatchNorm scales stay 1; only the biases train")
    p.add_argument("--bn-momentum", type=float, default=Recipe.bn_momentum,
                   help="weight of the newest batch in BatchNorm's running statistics")
    p.add_argument("--dirac", action=argparse.BooleanOptionalAction, default=Recipe.dirac,
                   help="3x3 convolutions start as the identity on their first in_channels filters")
    p.add_argument("--downsample-init", choices=("random", "avg"), default=Recipe.downsample_init,
                   help="with --pool conv: start each stride-2 convolution as average pooling (avg)")
    p.add_argument("--logit-scale", type=float, default=Recipe.logit_scale,
                   help="scale of the fc output in training (folded into fc at export)")
    p.add_argument("--whiten-bias-epochs", type=int, default=Recipe.whiten_bias_epochs,
                   help="epochs the whitening layer's bias trains before it freezes")
    p.add_argument("--whiten-fit-images", type=int, default=Recipe.whiten_fit_images,
                   help="the whitening layer is fitted on a random sample of this many training images")
    p.add_argument("--lookahead", action=argparse.BooleanOptionalAction, default=Recipe.lookahead,
                   help="airbench's lookahead weight averaging every 5 steps")
    p.add_argument("--alternate-flip", action=argparse.BooleanOptionalAction, default=Recipe.alternate_flip,
                   help="flip each image one way in odd epochs and the other in even ones, instead of a coin per batch")
    p.add_argument("--seed", type=int, default=Recipe.seed,
                   help="training seed: initial weights, data order, augmentation, the whitening fit's sample")
    p.add_argument("--split-seed", type=int, default=Recipe.split_seed,
                   help="seed of the validation split, independent of --seed (0: the shipped models' split)")
    p.add_argument("--translate", type=int, default=Recipe.translate_px, help="random shifts up to this many pixels")
    p.add_argument("--cutout", type=int, default=Recipe.cutout, help="cutout square side in pixels (0: off)")
    p.add_argument("--label-smoothing", type=float, default=Recipe.label_smoothing)
    p.add_argument("--val-per-class", type=int, default=Recipe.val_per_class, help="validation images per class")
    p.add_argument("--full", action="store_true", help="train on all 50,000 images (no validation figure)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    p.add_argument("--name", default=None, help="model name in the metadata (default: the output file's stem)")
    p.add_argument("--version", default="1")
    p.add_argument("--out", required=True, help="TorchScript file to write")
    p.add_argument("--metrics-json", default=None, help="training metrics JSON (default: OUT with .json)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.teacher_tta and not args.teacher:
        p.error("--teacher-tta needs --teacher")
    if (args.resume or args.stop_after is not None) and not args.checkpoint_dir:
        p.error("--resume and --stop-after need --checkpoint-dir")
    if args.whiten_fit_images < 1:
        p.error(f"--whiten-fit-images must be at least 1, got {args.whiten_fit_images}")
    if not 0.0 <= args.ema < 1.0:
        p.error(f"--ema must be in [0, 1), got {args.ema}")
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    widths, residual, whiten = ARCHS[args.arch]
    if args.widths:
        widths = tuple(int(w) for w in args.widths.split(","))
    if args.residual is not None:
        residual = args.residual
    if args.whiten is not None:
        whiten = args.whiten
    torch.manual_seed(args.seed)  # the initial weights too, so two runs with the same flags start alike
    if args.init:  # fine-tuning: the network and its weights come from the file
        net, init_meta = load_eager(args.init)
    else:
        net, init_meta = CifarNet(NetConfig(pool=args.pool, pool_size=args.pool_size, widths=widths,
                                            residual=residual, whiten=whiten)), None
    recipe = Recipe(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                    split_seed=args.split_seed,
                    warmup_epochs=args.warmup_epochs, teacher_tta=args.teacher_tta,
                    translate_px=args.translate, cutout=args.cutout, label_smoothing=args.label_smoothing,
                    val_per_class=args.val_per_class, kd_weight=args.kd_weight if args.teacher else 0.0,
                    kd_temperature=args.kd_temperature, ema_decay=args.ema, ema_every=args.ema_every,
                    lr_start=args.lr_start, lr_end=args.lr_end, momentum=args.momentum,
                    weight_decay=args.weight_decay, bias_lr_scale=args.bias_lr_scale,
                    frozen_bn_weights=args.frozen_bn_weights, bn_momentum=args.bn_momentum, dirac=args.dirac,
                    downsample_init=args.downsample_init,
                    logit_scale=args.logit_scale, whiten_bias_epochs=args.whiten_bias_epochs,
                    whiten_fit_images=args.whiten_fit_images,
                    lookahead=args.lookahead, alternate_flip=args.alternate_flip)
    teacher, teacher_meta = None, None
    if args.teacher:  # rebuilt as an eager network, so autocast applies to it
        teacher, teacher_meta = load_eager(args.teacher)
        teacher = teacher.to(device, memory_format=torch.channels_last).eval()
    data = load_training_set(args.data, download=args.download, cache_dir=args.cache_dir)
    log.info("data: %s, %d images; device %s; config %s", data.source, len(data.labels), device, net.config)
    result = train(net, data, recipe, device, full=args.full, progress=not args.no_progress, teacher=teacher,
                   fresh=not args.init, checkpoint_dir=args.checkpoint_dir, resume=args.resume,
                   stop_after=args.stop_after)
    if not result["finished"]:  # a piece of a run: the checkpoint holds it, there is no model to export yet
        return 0
    final = result["history"][-1]
    out = Path(args.out)
    name = args.name or out.stem
    command = "python -m model.train " + " ".join(argv if argv is not None else sys.argv[1:])
    metadata = build_metadata(
        net, name, args.version,
        dataset={"source": data.source, "sha256": data.sha256, "note": "CIFAR-10 (JPEG) where source is the archive"},
        training={"recipe": asdict(recipe), "teacher": teacher_note(teacher_meta),
                  "init": init_note(init_meta), "full": args.full, "train_images": result["train_images"],
                  "whitening_fit": result["whitening_fit"],
                  "seconds": round(result["train_seconds"], 1), "hardware": hardware(device), "command": command},
        validation={"images": result["validation_images"], "accuracy": final.get("accuracy"),
                    "accuracy_flip_tta": final.get("accuracy_flip_tta"), "split_seed": recipe.split_seed,
                    "indices_sha256": result["validation_indices_sha256"]},
    )
    export_torchscript(net, out, metadata)
    metrics_path = Path(args.metrics_json) if args.metrics_json else out.with_suffix(".json")
    metrics_path.write_text(json.dumps({"metadata": metadata, **result}, indent=1))
    log.info("wrote %s (%.1f MB) and %s", out, os.path.getsize(out) / 1e6, metrics_path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
