"""Training checkpoints: everything a run needs to continue where it stopped, bit for bit on the CPU.

One file, ``last.pt`` in the checkpoint folder, rewritten at the end of every epoch: written to a
temporary file, flushed to disk, then renamed over the old one, so a run killed mid-write leaves the
previous epoch's checkpoint intact. Only tensors, numbers, strings and containers are stored, so it
loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch

CHECKPOINT_FILE = "last.pt"


def rng_states() -> dict:
    """The global RNG states of torch (CPU and CUDA), numpy and Python, in a weights-only-safe form."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_states(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(directory: str | Path, state: dict) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path, tmp = directory / CHECKPOINT_FILE, directory / f".{CHECKPOINT_FILE}.tmp"
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)  # atomic on POSIX: readers see the old file or the new one, never half of one
    return path


def load_checkpoint(directory: str | Path) -> dict | None:
    """The last checkpoint in ``directory``, or None when there is none yet."""
    path = Path(directory) / CHECKPOINT_FILE
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)
