"""Images for tests: random pixels, and files encoded from them."""

from __future__ import annotations

import numpy as np

from bench.inputs import encode  # one encoder for the tests and the benchmarks' inputs

__all__ = ["encode", "random_images"]


def random_images(n: int, seed: int = 0, size: int = 32) -> np.ndarray:
    """n x size x size x 3 uint8, smooth enough to survive JPEG and resizing recognisably."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
