"""Weight averaging, the trick of the fast CIFAR-10 trainers, in two forms.

- ``EMA``: an exponential moving average of the weights, a copy of the network that follows the
  trained one slowly and is exported in its place. Every ``every`` optimizer steps each parameter moves
  ``ema = decay * ema + (1 - decay) * weight``; BatchNorm's running statistics (buffers) are copied,
  not averaged, so they describe the batches the averaged weights would see.
- ``Lookahead``: airbench's form, where the trained network is reset onto the average (see the class).
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


class Lookahead:
    """airbench's lookahead: every ``every`` steps an average of the weights (and of BatchNorm's
    statistics) moves toward the trained network and the trained network is reset onto it:
    ``avg = d * avg + (1 - d) * net; net = avg``. The decay ``d = base ** every * (step / total) ** 3``
    starts at 0 (the average just follows) and grows to ``base ** every`` at the end, so late steps
    are averaged more; ``finish`` ends the run on the average. Unlike ``EMA`` the trained network
    itself continues from the average, so nothing separate is exported."""

    def __init__(self, net: nn.Module, total_steps: int, every: int = 5, base: float = 0.95) -> None:
        if total_steps < 1 or every < 1 or not 0.0 < base < 1.0:
            raise ValueError(f"lookahead needs total_steps >= 1, every >= 1 and base in (0, 1); got "
                             f"{total_steps!r}, {every!r}, {base!r}")
        self.total, self.every, self.base = total_steps, every, base
        self.average = {k: v.detach().clone() for k, v in net.state_dict().items() if v.is_floating_point()}

    def decay(self, step: int) -> float:
        return self.base ** self.every * (min(step, self.total) / self.total) ** 3

    @torch.no_grad()
    def step(self, net: nn.Module, step: int) -> None:
        """Called after optimizer step number ``step`` (1-based); acts on every ``every``-th."""
        if step % self.every == 0:
            self._pull(net, self.decay(step))

    @torch.no_grad()
    def finish(self, net: nn.Module) -> None:
        """Puts the average into ``net`` (airbench's last update, with decay 1)."""
        self._pull(net, 1.0)

    def _pull(self, net: nn.Module, decay: float) -> None:
        state = net.state_dict()
        for name, avg in self.average.items():
            avg.lerp_(state[name], 1.0 - decay)
            state[name].copy_(avg)

    def state_dict(self) -> dict:
        return {"average": self.average, "total": self.total, "every": self.every, "base": self.base}

    def load_state_dict(self, state: dict) -> None:
        for name, avg in self.average.items():
            avg.copy_(state["average"][name])
