"""Test support: tiny exported models, a real server on an ephemeral port, image makers."""

from __future__ import annotations

import asyncio
import io
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cifar10_serving.model.export import build_metadata, export_torchscript
from cifar10_serving.model.network import CifarNet, NetConfig
from cifar10_serving.server.config import ServerConfig

TINY_WIDTHS = (4, 8, 8)  # fast on any CPU, still three pooled stages


def export_tiny(directory: Path, name: str, pool: str = "max", pool_size: int = 2, seed: int = 0,
                residual: bool = False) -> Path:
    """A randomly initialised tiny CifarNet, with BN statistics made non-trivial, exported as ``name``."""
    torch.manual_seed(seed)
    net = CifarNet(NetConfig(pool=pool, pool_size=pool_size, widths=TINY_WIDTHS, residual=residual))
    with torch.no_grad():  # a few batches in train mode give BN real running statistics
        net.train()
        for _ in range(3):
            net.logits(torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8))
        for module in net.modules():  # residual branches start with zero BN weights: wake them up
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
    net.eval()
    meta = build_metadata(net, name, "test", validation={"images": 0, "accuracy": None})
    return export_torchscript(net, Path(directory) / f"{name}.pt", meta)


def make_config(models_dir: Path, **overrides) -> ServerConfig:
    base = ServerConfig(host="127.0.0.1", port=0, metrics_port=0, models_dir=str(models_dir),
                        default_model="tiny-max", warmup_batches=1, torch_threads=1, instances=1,
                        grace_period_seconds=5.0)
    return replace(base, **overrides)


class RunningServer:
    """A real server (``server.main.create_server``) on its own event loop in a background thread."""

    def __init__(self, config: ServerConfig, registry=None) -> None:
        from cifar10_serving.server.main import create_server

        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="test-server", daemon=True)
        self.thread.start()
        self.app = self.run(create_server(config, registry), timeout=120)
        self.target = f"127.0.0.1:{self.app.port}"

    def run(self, coro, timeout: float = 30):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self, grace: float | None = None) -> None:
        try:
            self.run(self.app.stop(grace), timeout=60)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()


def random_images(n: int, seed: int = 0, size: int = 32) -> np.ndarray:
    """n x size x size x 3 uint8, smooth enough to survive JPEG and resizing recognisably."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def encode(array: np.ndarray, fmt: str = "PNG", mode: str | None = None, **params) -> bytes:
    buffer = io.BytesIO()
    img = Image.fromarray(array)
    if mode:
        img = img.convert(mode)
    img.save(buffer, format=fmt, **params)
    return buffer.getvalue()
