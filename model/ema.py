"""Exponential moving average of a network's weights (the EMA / lookahead trick of the fast CIFAR-10
trainers): a copy of the network that follows the trained one slowly and is exported in its place.

Every ``every`` optimizer steps each parameter moves ``ema = decay * ema + (1 - decay) * weight``;
BatchNorm's running statistics (buffers) are copied, not averaged, so they describe the batches the
averaged weights would see about as well as the trained network's do.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    def __init__(self, net: nn.Module, decay: float, every: int = 1) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay!r}")
        if every < 1:
            raise ValueError(f"EMA update interval must be at least 1 step, got {every!r}")
        self.decay, self.every, self.steps = decay, every, 0
        self.module = copy.deepcopy(net).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, net: nn.Module) -> None:
        """Called after each optimizer step; averages on every ``every``-th call."""
        self.steps += 1
        if self.steps % self.every:
            return
        for avg, p in zip(self.module.parameters(), net.parameters()):
            avg.lerp_(p.detach(), 1.0 - self.decay)
        for avg, b in zip(self.module.buffers(), net.buffers()):
            avg.copy_(b)

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "steps": self.steps, "decay": self.decay, "every": self.every}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.steps = state["steps"]
