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
classification: that is the cost the limits bound.
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import grpc
import numpy as np
import torch
from torch.nn import functional as F

from cifar10_serving.protos.cifar10.v1 import classifier_pb2 as pb
from cifar10_serving.server.calls import Call, Rejection, deadline_of
from cifar10_serving.server.config import ServerConfig
from cifar10_serving.server.images import ImageError, decode_into
from cifar10_serving.server.metrics import Metrics
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
    """The Explain RPC's handler. ``resolve`` finds a model by a request's name and ``label`` names it
    in the metrics: the service's own rules, so Explain finds and counts models as Classify does."""

    def __init__(self, config: ServerConfig, metrics: Metrics, resolve: Callable[[str], LoadedModel],
                 label: Callable[[str], str], max_images: int = MAX_IMAGES, threads: int = THREADS,
                 max_waiting: int = MAX_WAITING) -> None:
        self.config = config
        self.metrics = metrics
        self.resolve = resolve
        self.label = label
        self.max_images = max_images
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="explain", initializer=lower_priority,
                                        initargs=(config.compute_nice,))
        self._slots = threads + max_waiting  # requests running or queued
        self._taken = 0
        self._modules: dict[str, torch.jit.ScriptModule] = {}
        self._load_lock = threading.Lock()

    async def Explain(self, request: pb.ExplainRequest, context: grpc.aio.ServicerContext) -> pb.ExplainResponse:
        deadline = deadline_of(context)
        try:
            with Call(self.metrics, "Explain", self.label(request.model), deadline=deadline, in_flight=True):
                return await self._explain(request, deadline)
        except Rejection as rejection:
            await context.abort(rejection.code, rejection.message)

    async def _explain(self, request: pb.ExplainRequest, deadline: float | None) -> pb.ExplainResponse:
        model, layer, classes = self._plan(request)
        if self._taken >= self._slots:
            raise Rejection(grpc.StatusCode.RESOURCE_EXHAUSTED,
                            f"{self._taken} explanations running or waiting, the limit; retry later")
        self._taken += 1  # counted on the event loop's thread: no lock needed
        try:
            maps = await asyncio.get_running_loop().run_in_executor(
                self._pool, self._run, request, model, layer, classes, deadline)
        finally:
            self._taken -= 1
        return _respond(request, model, layer, maps)

    def _plan(self, request: pb.ExplainRequest) -> tuple[LoadedModel, str, int | None]:
        model = self.resolve(request.model)
        n = len(request.images)
        if not 1 <= n <= self.max_images:
            raise Rejection(grpc.StatusCode.INVALID_ARGUMENT,
                            f"{n} images to explain; send 1 to {self.max_images} per request")
        if request.resize not in pb.ResizeMode.values():
            raise Rejection(grpc.StatusCode.INVALID_ARGUMENT, f"unknown resize mode {request.resize}")
        layer = request.layer or default_layer(model)
        if layer not in spatial_layers(model):
            known = "has no layer" if layer not in model.layer_names else "has no H x W map at"
            raise Rejection(grpc.StatusCode.INVALID_ARGUMENT,
                            f"model {model.name!r} {known} {layer[:80]!r} for Grad-CAM; "
                            f"choose one of: {', '.join(spatial_layers(model))}")
        classes = request.class_index if request.HasField("class_index") else None
        if classes is not None and classes >= len(model.class_names):
            raise Rejection(grpc.StatusCode.INVALID_ARGUMENT,
                            f"class_index {classes}; model {model.name!r} has classes 0 to {len(model.class_names) - 1}")
        return model, layer, classes

    def _run(self, request: pb.ExplainRequest, model: LoadedModel, layer: str, target: int | None,
             deadline: float | None) -> Maps:
        """On an explain thread: decode, then the forward and backward pass."""
        if deadline is not None and time.monotonic() >= deadline:
            raise Rejection(grpc.StatusCode.DEADLINE_EXCEEDED, "the deadline passed while the explanation waited")
        images = np.empty((len(request.images), *model.input_shape), dtype=np.uint8)
        try:
            for i, image in enumerate(request.images):
                decode_into(image, i, images[i], request.resize, self.config.max_image_pixels)
        except ImageError as exc:
            raise Rejection(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        x = torch.from_numpy(images).to(model.device)
        classes = None if target is None else torch.full((len(images),), target, dtype=torch.long, device=model.device)
        return explain(self._module(model), x, classes, layer, logits_layer(model))

    def _module(self, model: LoadedModel) -> torch.jit.ScriptModule:
        """The model's unfrozen copy, from the file the served one came from; loaded once, on first use."""
        with self._load_lock:
            if model.name not in self._modules:
                self._modules[model.name] = load_artifact(model.path, model.device, optimize=False).module
            return self._modules[model.name]


def _respond(request: pb.ExplainRequest, model: LoadedModel, layer: str, maps: Maps) -> pb.ExplainResponse:
    shape = list(maps.saliency.shape[1:])
    explanations = [
        pb.Explanation(class_index=int(c), label=model.class_names[int(c)], probability=float(p), maps=[
            pb.ExplanationMap(method=SALIENCY, layer=INPUT, shape=shape, values=s.ravel().tolist()),
            pb.ExplanationMap(method=GRAD_CAM, layer=layer, shape=shape, values=g.ravel().tolist())])
        for c, p, s, g in zip(maps.classes, maps.probabilities, maps.saliency, maps.grad_cam)]
    return pb.ExplainResponse(request_id=request.request_id, model=model.name, model_version=model.version,
                              explanations=explanations)
