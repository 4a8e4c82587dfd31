"""Filters: the learned weights of a model's convolutions and fully connected layer, as numpy arrays.

The served module is frozen (``server.models.optimize_for_serving``): its weights are constants of
the graph, with batch norm folded into the convolutions where freezing can. What is returned here
are the trained kernels as the model file holds them, read from an unfrozen copy of the same file,
as the explanation path does (``server.explain``): they are what model/ trained, what produced each
convolution's feature map (a conv layer's map is its output before its batch norm, so folded
kernels would not match the map shown beside them), and what anyone reads back with
``torch.jit.load``. A version's copy is loaded on its first request, off the event loop, and only
its weights are kept, for the last ``MAX_CACHED`` versions asked for. The answer is the front-end's.
"""

from __future__ import annotations

import asyncio
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from cifar10_serving.server.answer_budget import HELD_COPIES, MAP_OVERHEAD_BYTES
from cifar10_serving.server.errors import Code, Rejection, invalid, quote
from cifar10_serving.server.models import LoadedModel, ModelLoadError, load_artifact

WEIGHTED_KINDS = ("patch_whitening", "conv", "conv_downsample", "fc")  # layer kinds with filters to show
ALL_LAYERS = "*"
# Versions whose weights stay in memory: the bundled models are 1 to 7 MB of float32 each, so eight
# versions hold tens of MB at most, and a version unloaded by the repository ages out.
MAX_CACHED = 8


@dataclass(frozen=True)
class LayerWeights:
    """One layer's trained weights, float32: ``weight`` (out, in, kH, kW) for a convolution or
    (out, in) for fc; ``bias`` (out,), None when the layer has none."""

    layer: str
    kind: str
    weight: np.ndarray
    bias: np.ndarray | None

    @property
    def elements(self) -> int:
        return self.weight.size + (0 if self.bias is None else self.bias.size)


def weighted_layers(model: LoadedModel) -> list[str]:
    """The layers with filters, in the model's order."""
    return [row["name"] for row in model.metadata["layers"] if row["kind"] in WEIGHTED_KINDS]


def plan(model: LoadedModel, names: Sequence[str]) -> tuple[str, ...]:
    """The layers a request asks for, in the model's order: empty or ``*`` for every layer with
    weights; INVALID_ARGUMENT for an unknown layer or one without weights, naming those that have them."""
    offered = weighted_layers(model)
    names = list(names)
    if not names or names == [ALL_LAYERS]:
        return tuple(offered)
    if len(names) > len(model.layer_names):  # its length first: a list of millions is refused unread
        raise invalid(f"{len(names):,} layers asked for; model {model.name!r} has {len(offered)} with weights: "
                      f"{', '.join(offered)}, or send {ALL_LAYERS!r} alone")
    kinds = {row["name"]: row["kind"] for row in model.metadata["layers"]}
    for name in names:
        if name == ALL_LAYERS:
            raise invalid(f"{ALL_LAYERS!r} asks for every layer with weights; send it alone")
        if name not in kinds:
            raise invalid(f"model {model.name!r} has no layer {quote(name)}; layers with weights: {', '.join(offered)}")
        if kinds[name] not in WEIGHTED_KINDS:
            raise invalid(f"layer {quote(name)} of model {model.name!r} is {kinds[name]}, which has no filters; "
                          f"layers with weights: {', '.join(offered)}")
    if len(set(names)) < len(names):
        raise invalid("a layer asked for twice; name each once")
    order = {name: i for i, name in enumerate(model.layer_names)}
    return tuple(sorted(names, key=order.__getitem__))


def answer_bytes(weights: Sequence[LayerWeights], itemsize: int, request_bytes: int) -> int:
    """What an answer with ``weights`` holds until written: the request (gRPC's bytes and the parsed
    message), the values at ``itemsize`` in ``HELD_COPIES`` (message, serialisation, gRPC's copy)
    plus the converted arrays they are built from, and each layer's fields."""
    elements = sum(w.elements for w in weights)
    return (2 * request_bytes + (HELD_COPIES + 1) * elements * itemsize
            + HELD_COPIES * MAP_OVERHEAD_BYTES * 2 * len(weights))


def payload_bytes(weights: Sequence[LayerWeights], itemsize: int) -> int:
    """The answer's size on the wire, about: its values, and each layer's fields."""
    return sum(w.elements for w in weights) * itemsize + MAP_OVERHEAD_BYTES * 2 * len(weights)


def read_weights(model: LoadedModel) -> dict[str, LayerWeights]:
    """Every layer's weights from an unfrozen copy of the model's file, loaded on the CPU (blocking:
    call it off the event loop). A layer's module is the one whose dotted path is its name or ends
    with it: model/ names layers without their container (``stages.stage1.conv1`` is ``stage1.conv1``)."""
    try:
        copy = load_artifact(model.path, torch.device("cpu"), optimize=False)
    except ModelLoadError as exc:  # the file went away or changed since the version was loaded
        raise Rejection(Code.UNAVAILABLE, f"the weights of model {model.name!r} cannot be read now: {exc}") from None
    if copy.version != model.version:
        raise Rejection(Code.UNAVAILABLE, f"the file of model {model.name!r} version {model.version!r} now holds "
                                          f"version {copy.version!r}; retry once the repository has loaded it")
    modules = dict(copy.module.named_modules())
    out = {}
    kinds = {row["name"]: row["kind"] for row in model.metadata["layers"]}
    for name in weighted_layers(model):
        found = [m for path, m in modules.items() if path == name or path.endswith("." + name)]
        params = dict(found[0].named_parameters(recurse=False)) if len(found) == 1 else {}
        weight = params.get("weight")
        if weight is None or weight.dim() not in (2, 4):
            raise Rejection(Code.INTERNAL, f"model {model.name!r}: no weights found for layer {name!r} in its module")
        bias = params.get("bias")
        with torch.no_grad():
            out[name] = LayerWeights(name, kinds[name], weight.detach().float().numpy().copy(),
                                     None if bias is None else bias.detach().float().numpy().copy())
    return out


class WeightStore:
    """Each model version's weights, read on its first request on a thread of the loop's default
    executor (loading a file takes about a second), one read per version however many ask at once.
    Used from the event loop's thread."""

    def __init__(self, max_cached: int = MAX_CACHED) -> None:
        self.max_cached = max_cached
        self._weights: OrderedDict[tuple[str, str], asyncio.Future] = OrderedDict()

    def forget(self, name: str, version: str) -> None:
        """Drops a version's weights: it was unloaded (a reload reads its file again)."""
        self._weights.pop((name, version), None)

    async def get(self, model: LoadedModel) -> dict[str, LayerWeights]:
        key = (model.name, model.version)
        future = self._weights.get(key)
        if future is None:
            future = asyncio.get_running_loop().run_in_executor(None, _read_quietly, model)
            self._weights[key] = future
            while len(self._weights) > self.max_cached:
                self._weights.popitem(last=False)
        self._weights.move_to_end(key)
        try:
            return await asyncio.shield(future)  # a caller that goes away leaves the read for the next
        except Exception:
            if self._weights.get(key) is future:
                del self._weights[key]  # a failed read is tried again by the next request
            raise


def _read_quietly(model: LoadedModel) -> dict[str, LayerWeights]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return read_weights(model)
