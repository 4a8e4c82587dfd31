"""What each way of downsampling keeps: the feature maps after every downsampling layer, one picture
per model, for the same image.

    python -m model.figures                                   # the shipped base models, examples/cat.jpg
    python -m model.figures model/artifacts/base-*.pt --image examples/ship.jpg --out model/figures

Each picture has the input on the left, then one row per downsampling layer (``stage1.pool``,
``stage2.pool``, ...: max pooling, average pooling or a learned stride-2 convolution, whatever the
model has), each showing that layer's most active channels (by mean activation on this image), each
map scaled to its own range (dark: low, bright: high) and enlarged with nearest-neighbour pixels so
each of its W x H cells stays visible. The label under a row gives the layer, its kind and its output
volume (depth x width x height), so the picture shows what the layer table says: width and height
halve at each downsampling, depth does not change.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from cifar10_serving.model.data import REPO
from cifar10_serving.model.export import load_scripted

DOWNSAMPLING_KINDS = ("maxpool", "avgpool", "conv_downsample")
CELL = 96  # pixels each map is drawn at (a 16 x 16 map: 6 x 6 pixels per cell)
GAP = 6
LABEL = 16


def downsampling_layers(metadata: dict) -> list[dict]:
    """The metadata rows of the layers that halve width and height: the stages' pooling layers (a
    strided convolution in their place has the kind the exporter gives it)."""
    return [row for row in metadata["layers"] if row["name"].endswith(".pool") and not row["name"].startswith("head")]


def feature_maps(path: Path, image: np.ndarray) -> tuple[dict, dict[str, np.ndarray], np.ndarray]:
    module, metadata = load_scripted(path)
    module.eval()
    layers = [row["name"] for row in downsampling_layers(metadata)]
    x = torch.from_numpy(image).permute(2, 0, 1).unsqueeze(0).contiguous()
    with torch.inference_mode():
        probs, feats = module.forward_with_features(x, layers)
    return metadata, {name: feats[name][0].numpy() for name in layers}, probs[0].numpy()


def _map_tile(volume: np.ndarray, channel: int) -> Image.Image:
    m = volume[channel]
    lo, hi = float(m.min()), float(m.max())
    scaled = np.zeros_like(m) if hi <= lo else (m - lo) / (hi - lo)
    tile = Image.fromarray((scaled * 255).astype(np.uint8), mode="L")
    return tile.resize((CELL, CELL), Image.NEAREST)


def picture(path: Path, image: np.ndarray, channels: int) -> tuple[Image.Image, str]:
    metadata, maps, probs = feature_maps(path, image)
    rows = downsampling_layers(metadata)
    width = CELL + GAP + channels * (CELL + GAP)
    height = len(rows) * (CELL + LABEL + GAP) + LABEL
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    canvas.paste(Image.fromarray(image).resize((CELL, CELL), Image.NEAREST), (0, LABEL))
    top = int(np.argmax(probs))
    title = f"{metadata['name']}: {metadata['class_names'][top]} {probs[top]:.2f}"
    draw.text((0, 0), title, fill="black")
    for r, row in enumerate(rows):
        volume = maps[row["name"]]
        y = LABEL + r * (CELL + LABEL + GAP)
        strongest = np.argsort(volume.reshape(len(volume), -1).mean(1))[::-1][:channels]
        for c, channel in enumerate(strongest):
            canvas.paste(_map_tile(volume, int(channel)), (CELL + GAP + c * (CELL + GAP), y))
        depth, h, w = volume.shape
        draw.text((CELL + GAP, y + CELL + 2), f"{row['name']} ({row['kind']}): {depth} x {w} x {h}, "
                  f"the {channels} most active channels", fill="black")
    return canvas, title


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m model.figures", description=__doc__.split("\n")[0])
    p.add_argument("artifacts", nargs="*", type=Path, help="default: model/artifacts/base-*.pt")
    p.add_argument("--image", type=Path, default=REPO / "examples" / "cat.jpg")
    p.add_argument("--channels", type=int, default=8)
    p.add_argument("--out", type=Path, default=REPO / "model" / "figures")
    args = p.parse_args(argv)
    paths = args.artifacts or sorted((REPO / "model" / "artifacts").glob("base-*.pt"))
    image = np.array(Image.open(args.image).convert("RGB").resize((32, 32)))
    args.out.mkdir(parents=True, exist_ok=True)
    for path in paths:
        canvas, title = picture(path, image, args.channels)
        out = args.out / f"{path.stem}-{args.image.stem}.png"
        canvas.save(out)
        print(f"{out}: {title}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
