"""Explain: why a model gives an image its class, as saliency and Grad-CAM maps the input's size.

- Saliency (Simonyan et al., 2014): the gradient of the class's score (its logit) with respect to the
  input pixels, on the model's 0..255 input scale; its absolute value, largest over R, G and B.
- Grad-CAM (Selvaraju et al., 2017) at one layer: each channel of that layer's output weighted by
  the mean gradient of the score over the channel, summed, kept where positive, and scaled up to the
  input's size bilinearly.

Gradients need what serving leaves out, so explanations take their own path and never the batcher's:
their own copy of each model, loaded from the same file without freezing (the served module is frozen
and runs under inference mode), loaded on a model's first explanation; their own thread, so a slow
explanation never holds a forward pass; and their own limits, a few images per request and a short
queue, past which a caller gets RESOURCE_EXHAUSTED at once. On a CPU they share the cores with
classification: that is the cost the limits bound. Images reach it decoded, through the core's
decode lanes and limits like any other request's (``server.core``); the answer is the front-end's.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

from cifar10_serving.server.errors import Code, Rejection, invalid, quote
from cifar10_serving.server.models import LoadedModel, load_artifact
from cifar10_serving.server.priority import lower_priority

MAX_IMAGES = 8  # per request: a backward pass costs a few forward passes, and holds its activations
THREADS = 1  # explanations at once; one keeps them from taking more than a share of a CPU server
MAX_WAITING = 4  # requests queued behind the running ones before callers are told RESOURCE_EXHAUSTED
SALIENCY, GRAD_CAM, INPUT = "saliency", "grad_cam", "input"


@dataclass(frozen=True)
class Maps:
    """One batch's explanations: per image the class explained, its probability and the two maps."""

    classes: np.ndarray  # N, int
    probabilities: np.ndarray  # N, float32
    saliency: np.ndarray  # N x H x W, float32
    grad_cam: np.ndarray  # N x H x W, float32


def logits_layer(model: LoadedModel) -> str:
    """The fully connected layer whose outputs are the class scores before softmax."""
    return next(row["name"] for row in reversed(model.metadata["layers"]) if row["kind"] == "fc")


def spatial_layers(model: LoadedModel) -> list[str]:
    """Layers with an H x W map of more than one position: the ones Grad-CAM can be taken at."""
    return [row["name"] for row in model.metadata["layers"]
            if len(row["output_shape"]) == 3 and row["output_shape"][1] * row["output_shape"][2] > 1]


def default_layer(model: LoadedModel) -> str:
    """The last stage's output (the last layer with a map), where Grad-CAM is usually taken."""
    return spatial_layers(model)[-1]


def explain(module: torch.jit.ScriptModule, images: torch.Tensor, classes: torch.Tensor | None, layer: str,
            logits: str) -> Maps:
    """Saliency and Grad-CAM at ``layer`` for N uint8 images 3 x H x W; ``classes`` None: each one's top.

    Images are independent in eval mode, so one backward pass of the summed scores gives every
    image's own gradients."""
    x = images.float().requires_grad_(True)  # the model's own normalisation takes the 0..255 scale
    # Unoptimised execution (a setting of this thread only): after its first runs TorchScript's
    # executor fuses the graph into differentiable blocks whose feature outputs are copies, cut off
    # from the gradient ("not used in the graph"); op by op, each feature is the tensor used next.
    with torch.enable_grad(), torch.jit.optimized_execution(False):
        probabilities, features = module.forward_with_features(x, [layer, logits])
        if classes is None:
            classes = probabilities.argmax(dim=1)
        score = features[logits].gather(1, classes[:, None]).sum()
        d_input, d_layer = torch.autograd.grad(score, [x, features[layer]])
    with torch.no_grad():
        saliency = d_input.abs().amax(dim=1)
        weights = d_layer.mean(dim=(2, 3), keepdim=True)
        cam = F.relu((weights * features[layer]).sum(dim=1, keepdim=True))
        cam = F.interpolate(cam, size=tuple(x.shape[2:]), mode="bilinear", align_corners=False)[:, 0]
        chosen = probabilities.gather(1, classes[:, None])[:, 0]
    return Maps(classes.cpu().numpy(), chosen.cpu().numpy(), saliency.cpu().numpy(), cam.cpu().numpy())


class Explainer:
    """The explanation path: its limits, its thread and each model's unfrozen copy.

    ``plan`` checks a request, ``slot`` holds one of the path's places (refusing at once when all
    are taken), ``run`` computes on the path's thread. ``executor`` is the thread to run on (a test
    can pass one it holds); by default one thread of its own at ``compute_nice``."""

    def __init__(self, compute_nice: int = 0, *, max_images: int = MAX_IMAGES, threads: int = THREADS,
                 max_waiting: int = MAX_WAITING, executor: Executor | None = None) -> None:
        self.max_images = max_images
        self._pool = executor or ThreadPoolExecutor(threads, thread_name_prefix="explain", initializer=lower_priority,
                                                    initargs=(compute_nice,))
        self._slots = threads + max_waiting  # requests running or queued
        self._taken = 0
        self._modules: dict[tuple[str, str], torch.jit.ScriptModule] = {}
        self._load_lock = threading.Lock()

    @property
    def in_use(self) -> int:
        """Explanations running or waiting for the thread (or decoding, before they wait)."""
        return self._taken

    def plan(self, model: LoadedModel, images: int, layer: str, target: int | None) -> str:
        """The Grad-CAM layer for a request (``layer``, or the default), once the request is checked."""
        if not 1 <= images <= self.max_images:
            raise invalid(f"{images} images to explain; send 1 to {self.max_images} per request")
        layer = layer or default_layer(model)
        if layer not in spatial_layers(model):
            known = "has no layer" if layer not in model.layer_names else "has no H x W map at"
            raise invalid(f"model {model.name!r} {known} {quote(layer)} for Grad-CAM; "
                          f"choose one of: {', '.join(spatial_layers(model))}")
        if target is not None and not 0 <= target < len(model.class_names):
            raise invalid(f"class_index {target}; model {model.name!r} has classes 0 to {len(model.class_names) - 1}")
        return layer

    @contextlib.contextmanager
    def slot(self):
        """One of the path's places for the block; RESOURCE_EXHAUSTED at once when none is free.
        Used on the event loop's thread only: no lock needed."""
        if self._taken >= self._slots:
            raise Rejection(Code.RESOURCE_EXHAUSTED, f"{self._taken} explanations running or waiting, the limit; "
                            "retry later")
        self._taken += 1
        try:
            yield
        finally:
            self._taken -= 1

    async def run(self, model: LoadedModel, images: np.ndarray, layer: str, target: int | None,
                  deadline: float | None) -> Maps:
        """Saliency and Grad-CAM for uint8 images N x C x H x W, on the path's thread."""
        return await asyncio.get_running_loop().run_in_executor(
            self._pool, self._run, model, images, layer, target, deadline)

    def _run(self, model: LoadedModel, images: np.ndarray, layer: str, target: int | None,
             deadline: float | None) -> Maps:
        if deadline is not None and time.monotonic() >= deadline:
            raise Rejection(Code.DEADLINE_EXCEEDED, "the deadline passed while the explanation waited")
        x = torch.from_numpy(images).to(model.device)
        classes = None if target is None else torch.full((len(images),), target, dtype=torch.long, device=model.device)
        return explain(self._module(model), x, classes, layer, logits_layer(model))

    def forget(self, name: str, version: str) -> None:
        """Drops a version's unfrozen copy: it was unloaded (a reload loads its file again)."""
        with self._load_lock:
            self._modules.pop((name, version), None)

    def _module(self, model: LoadedModel) -> torch.jit.ScriptModule:
        """The model's unfrozen copy, from the file the served one came from; loaded once, on first use."""
        with self._load_lock:
            key = (model.name, model.version)
            if key not in self._modules:
                self._modules[key] = load_artifact(model.path, model.device, optimize=False).module
            return self._modules[key]
