"""The Explain RPC's answers as numpy arrays: ``ClassifierClient.explain`` returns these."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cifar10_serving.protos.cifar10.v1 import classifier_pb2 as pb


@dataclass(frozen=True)
class ExplanationMap:
    """One method's map over the input: ``values`` is H x W float32, not normalised."""

    method: str  # "saliency" or "grad_cam"
    layer: str  # "input" for saliency; Grad-CAM's layer
    values: np.ndarray


@dataclass
class Explanation:
    """Why one image scores a class: the class, its probability, and one map per method."""

    index: int
    label: str
    probability: float
    maps: list[ExplanationMap]

    def map(self, method: str) -> ExplanationMap:
        return next(m for m in self.maps if m.method == method)


def explanations(response: pb.ExplainResponse) -> list[Explanation]:
    return [Explanation(e.class_index, e.label, e.probability, [
        ExplanationMap(m.method, m.layer, np.asarray(m.values, dtype=np.float32).reshape(tuple(m.shape)))
        for m in e.maps]) for e in response.explanations]
