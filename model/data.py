"""CIFAR-10 training images as one uint8 tensor, from either of the two formats people have.

- The JPEG archive (``train/<class>/<NNNN>.jpg`` inside a ``.tar.gz``), as in ``shared/datasets``.
- The standard CIFAR-10 Python format (``cifar-10-batches-py/data_batch_1..5``), which
  ``torchvision.datasets.CIFAR10`` reads and, with network access, downloads.

Both give ``images`` uint8 N x 3 x 32 x 32 and ``labels`` int64 N, labels in CIFAR-10's own order
(alphabetical class names), so the rest of the code never knows which format it read.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import tarfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Tuple

import numpy as np
import torch
from torch import Tensor

REPO = Path(__file__).resolve().parent.parent  # the checkout, when run from one
DEFAULT_DATA = REPO.parent / "shared" / "datasets" / "cifar10-jpeg" / "train.tar.gz"
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
PYTHON_FORMAT_DIR = "cifar-10-batches-py"
DECODE_CHUNK = 4096  # decode_jpeg takes a list; chunks keep peak memory of the byte tensors small


@dataclass(frozen=True)
class Dataset:
    images: Tensor  # uint8, N x 3 x 32 x 32
    labels: Tensor  # int64, N
    source: str  # what was read, for the model's metadata
    sha256: str  # checksum of the file(s) read


def sha256_of(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def load_jpeg_archive(path: str | Path) -> Dataset:
    """Reads ``train/<class>/<name>.jpg`` members, sorted by class then file name."""
    with warnings.catch_warnings():  # torchvision 0.29 points to TorchCodec; its decoder is still right here
        warnings.simplefilter("ignore", DeprecationWarning)
        from torchvision.io import ImageReadMode, decode_jpeg

    path = Path(path)
    entries: list[tuple[int, str, bytes]] = []
    with tarfile.open(path, "r:*") as tar:
        for member in tar:
            parts = Path(member.name).parts
            if not member.isfile() or len(parts) < 2 or not parts[-1].lower().endswith((".jpg", ".jpeg")):
                continue
            cls = parts[-2]
            if cls not in CLASSES:
                raise ValueError(f"{path}: {member.name} is in unknown class folder {cls!r}")
            entries.append((CLASSES.index(cls), parts[-1], tar.extractfile(member).read()))
    if not entries:
        raise ValueError(f"{path}: no train/<class>/*.jpg files found")
    entries.sort(key=lambda e: (e[0], e[1]))
    images = []
    for start in range(0, len(entries), DECODE_CHUNK):
        chunk = [torch.frombuffer(bytearray(e[2]), dtype=torch.uint8) for e in entries[start : start + DECODE_CHUNK]]
        images.extend(decode_jpeg(chunk, mode=ImageReadMode.RGB))
    labels = torch.tensor([e[0] for e in entries], dtype=torch.int64)
    return Dataset(torch.stack(images), labels, f"jpeg-archive:{path.name}", sha256_of([path]))


def load_python_format(root: str | Path, download: bool = False) -> Dataset:
    """Reads the five pickled training batches (downloading them via torchvision into ``root`` if asked).

    The batches are read here rather than through ``torchvision.datasets.CIFAR10``, whose checksum
    test refuses anything but the official files (the tests write small synthetic ones).
    """
    root = Path(root)
    if root.name == PYTHON_FORMAT_DIR:  # accept the batches folder itself as well as its parent
        root = root.parent
    if download:
        from torchvision.datasets import CIFAR10

        CIFAR10(str(root), train=True, download=True)
    batches = [root / PYTHON_FORMAT_DIR / f"data_batch_{i}" for i in range(1, 6)]
    missing = [str(b) for b in batches if not b.is_file()]
    if missing:
        raise FileNotFoundError(f"CIFAR-10 Python-format batches missing: {', '.join(missing)}")
    data, labels = [], []
    for path in batches:
        with open(path, "rb") as f:
            # The dataset's own format is pickle; load only files you trust (as with any pickle).
            batch = pickle.load(f, encoding="bytes")
        data.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.extend(batch[b"labels"])
    images = torch.from_numpy(np.concatenate(data))
    return Dataset(images, torch.tensor(labels, dtype=torch.int64), "cifar10-python", sha256_of(batches))


def load_training_set(source: str | Path, download: bool = False, cache_dir: str | Path | None = None) -> Dataset:
    """Loads a ``.tar.gz`` JPEG archive or a Python-format folder; caches decoded JPEGs if asked."""
    source = Path(source)
    if source.is_file() and source.name.endswith((".tar.gz", ".tgz", ".tar")):
        if cache_dir is None:
            return load_jpeg_archive(source)
        digest = sha256_of([source])
        cache = Path(cache_dir) / f"cifar10-jpeg-{digest[:16]}.pt"
        if cache.exists():
            saved = torch.load(cache, weights_only=True)  # our own file: tensors and strings only
            return Dataset(saved["images"], saved["labels"], saved["source"], saved["sha256"])
        ds = load_jpeg_archive(source)
        cache.parent.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        torch.save({"images": ds.images, "labels": ds.labels, "source": ds.source, "sha256": ds.sha256}, buf)
        cache.write_bytes(buf.getvalue())
        return ds
    if source.is_dir() or download:
        return load_python_format(source, download=download)
    raise FileNotFoundError(f"{source}: neither a CIFAR-10 JPEG .tar.gz nor a CIFAR-10 Python-format folder")


def validation_split(labels: Tensor, per_class: int = 500, seed: int = 0) -> Tuple[Tensor, Tensor]:
    """Fixed, seeded (train_idx, val_idx): ``per_class`` images of each class go to validation.

    Images are chosen by their position within their class, so the split is the same whichever
    format (and hence whichever file order) the images came from, as long as each class keeps its
    own order.
    """
    gen = torch.Generator().manual_seed(seed)
    val = []
    for cls in range(int(labels.max()) + 1):
        idx = (labels == cls).nonzero().flatten()
        if len(idx) < per_class:
            raise ValueError(f"class {cls} has {len(idx)} images, fewer than per_class={per_class}")
        val.append(idx[torch.randperm(len(idx), generator=gen)[:per_class]])
    val_idx = torch.cat(val).sort().values
    mask = torch.ones(len(labels), dtype=torch.bool)
    mask[val_idx] = False
    return mask.nonzero().flatten(), val_idx
