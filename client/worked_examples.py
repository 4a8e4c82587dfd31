"""The numbers behind two steps of the network, taken from a real answer rather than made up: a
downsampling step worked on one 4x4 patch of its input (the seed's max-pooling example, 4x4 pooled
2x2 with stride 2 into a 2x2 result), and the pooled features that pushed the top class's score up
(each feature's value times its weight in the fully connected layer). numpy only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

OUTPUTS = 2  # the example's result is OUTPUTS x OUTPUTS values, from a patch of (OUTPUTS - 1) * S + F


@dataclass(frozen=True)
class DownsamplingExample:
    """One channel's patch of a downsampling layer's input and the 2x2 it produced.

    ``patch`` is input channel ``in_channel`` at rows ``top``.., columns ``left``..; ``result`` is
    output channel ``channel`` at rows ``top // stride``.., columns ``left // stride``... For a strided
    convolution every input channel adds to each output: ``kernel`` is the filter's slice for
    ``in_channel`` (F x F) and ``share`` what that channel alone added (``kernel`` times each window,
    summed); ``result`` is the sum over all input channels."""

    kind: str  # maxpool, avgpool or conv_downsample
    window: int
    stride: int
    channel: int
    in_channel: int
    top: int
    left: int
    patch: np.ndarray
    result: np.ndarray
    kernel: np.ndarray | None = None
    share: np.ndarray | None = None

    def window_values(self, row: int, col: int) -> np.ndarray:
        """The patch's values under output (row, col) of the example's 2x2."""
        y, x = row * self.stride, col * self.stride
        return self.patch[y : y + self.window, x : x + self.window]

    def expected(self, row: int, col: int) -> float:
        """What the layer's rule gives for output (row, col) from this patch: the window's largest
        value, its mean, or (a strided convolution) this channel's share only."""
        values = self.window_values(row, col)
        if self.kind == "maxpool":
            return float(values.max())
        if self.kind == "avgpool":
            return float(values.mean())
        return float((values * self.kernel).sum())


def downsampling_example(kind: str, before: np.ndarray, after: np.ndarray, window: int, stride: int,
                         weight: np.ndarray | None = None) -> DownsamplingExample | None:
    """The example for a layer that maps ``before`` (C x H x W, its input) to ``after`` (C' x H' x W')
    with windows of ``window`` at ``stride``, no padding; ``weight`` (C' x C x F x F) for a strided
    convolution. The channel shown is the one whose output is strongest, at the 2x2 around its
    largest value. None when the output is smaller than 2x2 or a strided convolution comes without
    its weights."""
    before, after = np.asarray(before, dtype=np.float32), np.asarray(after, dtype=np.float32)
    if before.ndim != 3 or after.ndim != 3 or min(after.shape[1:]) < OUTPUTS:
        return None
    if kind == "conv_downsample" and weight is None:
        return None
    channel = int(after.reshape(len(after), -1).max(axis=1).argmax())
    i, j = np.unravel_index(int(after[channel].argmax()), after.shape[1:])
    row, col = min(int(i), after.shape[1] - OUTPUTS), min(int(j), after.shape[2] - OUTPUTS)
    top, left, side = row * stride, col * stride, (OUTPUTS - 1) * stride + window
    result = after[channel, row : row + OUTPUTS, col : col + OUTPUTS].copy()
    if kind != "conv_downsample":
        patch = before[channel, top : top + side, left : left + side].copy()
        return DownsamplingExample(kind, window, stride, channel, channel, top, left, patch, result)
    patches = before[:, top : top + side, left : left + side]  # every input channel's patch
    kernels = np.asarray(weight, dtype=np.float32)[channel]  # C x F x F
    shares = np.zeros((len(patches), OUTPUTS, OUTPUTS), dtype=np.float32)
    for a in range(OUTPUTS):
        for b in range(OUTPUTS):
            y, x = a * stride, b * stride
            shares[:, a, b] = (patches[:, y : y + window, x : x + window] * kernels).sum(axis=(1, 2))
    source = int(np.abs(shares).sum(axis=(1, 2)).argmax())  # the input channel that moved the result most
    return DownsamplingExample(kind, window, stride, channel, source, top, left, patches[source].copy(), result,
                               kernels[source].copy(), shares[source])


@dataclass(frozen=True)
class Contribution:
    feature: int  # index into the pooled, flattened features
    value: float
    weight: float

    @property
    def product(self) -> float:
        return self.value * self.weight


def contributions(features: np.ndarray, weight: np.ndarray, target: int) -> list[Contribution]:
    """Every pooled feature's part in class ``target``'s score, ``value x weight`` (the fully
    connected layer's ``weight`` is classes x features), largest first; with the bias they sum to the score."""
    features = np.asarray(features, dtype=np.float32).reshape(-1)
    row = np.asarray(weight, dtype=np.float32)[target]
    order = np.argsort(-(features * row), kind="stable")
    return [Contribution(int(k), float(features[k]), float(row[k])) for k in order]
