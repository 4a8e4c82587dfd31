"""One self-contained HTML page that shows a whole network on one image, as ConvNetJS's CIFAR-10 demo
does: the input, the top-k, every layer's feature maps in order with the size rule each downsampling
step applied and the fully connected layer's ten scores; and, beside the answer, the server's
explanations (saliency and Grad-CAM) where it offers them. Where the server offers its filters
(GetFilters), each convolution shows them beside its maps, each downsampling step a worked example on
this image's own numbers, and the end the pooled features that raised the top class most. With several models, one column each, and
each layer's row across them, so max pooling, average pooling and a strided convolution can be
compared at the same layer.

    cifar10-client inspect examples/cat.jpg --models base-max,base-avg --out inspect/

The page is HTML and CSS with its pictures inlined as PNG ``data:`` URIs: no network, no script.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import grpc
import numpy as np
from PIL import Image

from cifar10_serving.client._client import Classification, ClassifierClient, ClassifierError
from cifar10_serving.client.explanation import Explanation
from cifar10_serving.client.featuremaps import shape_text
from cifar10_serving.client.filter_pictures import channel_grid, kernel_scale, rgb_patches, strongest_channels
from cifar10_serving.client.filters import LayerFilters
from cifar10_serving.client.worked_examples import contributions, downsampling_example
from cifar10_serving.client.pictures import as_volume, data_uri, enlarge, grid, overlay, tile_scale

INPUT_SCALE = 6  # 32 x 32 -> 192 x 192 on the page
COLUMN_PX = 400  # a model's column: its grids are enlarged to about this width
DOWNSAMPLING = ("maxpool", "avgpool", "conv_downsample")
ALL_LAYERS = "*"
RGB_SCALE = 8  # a first convolution's 3x3 filters drawn 24 px a side
CHANNELS_SHOWN = 4  # a deeper convolution's output channels drawn, the strongest on this image
BARS = 8  # pooled features shown as bars at the end


@dataclass
class ModelView:
    """What the page shows of one model: its ModelInfo, the classification with every layer's
    output, its explanation and its filters (each ``None``, with a note saying why there is none)."""

    info: object  # pb.ModelInfo
    result: Classification
    explanation: Explanation | None = None
    explain_note: str = ""
    filters: dict[str, LayerFilters] | None = None
    filters_note: str = ""
    layers: list = field(init=False)

    def __post_init__(self) -> None:
        self.layers = list(self.info.layers)


def load_input(path: str | Path, size: tuple[int, int] = (32, 32)) -> np.ndarray:
    """The image as the network sees it, H x W x 3 uint8: the shorter side scaled to the model's size,
    the centre cropped (the server's rule, as in server.images), done here so the page shows exactly
    the pixels classified. Any mode Pillow reads is converted to RGB: this is a picture for a person."""
    with Image.open(path) as img:
        img = img.convert("RGB")
        w, h = img.size
        th, tw = size
        if (h, w) != (th, tw):
            scale = max(th / h, tw / w)
            nh, nw = max(th, round(h * scale)), max(tw, round(w * scale))
            top, left = (nh - th) // 2, (nw - tw) // 2
            box = (left / scale, top / scale, (left + tw) / scale, (top + th) / scale)
            img = img.resize((tw, th), Image.Resampling.BILINEAR, box=box, reducing_gap=None)
        return np.asarray(img, dtype=np.uint8)


def gather(client: ClassifierClient, pixels: np.ndarray, models: Sequence[str] = ("",), top_k: int = 5,
           layer: str = "", timeout: float | None = None) -> list[ModelView]:
    """Classifies ``pixels`` with every layer's output, and asks for explanations (Grad-CAM at
    ``layer``; empty: the server's default), once per model."""
    views = []
    for name in models:
        info = client.model_info(name, timeout=timeout)
        result = client.classify([pixels], model=info.name, top_k=top_k, layers=[ALL_LAYERS], timeout=timeout)[0]
        views.append(ModelView(info, result, *_explain(client, pixels, info.name, layer, timeout),
                               *_filters(client, info.name, timeout)))
    return views


def _filters(client: ClassifierClient, model: str, timeout: float | None):
    """(filters, note): every layer's weights, or why there are none."""
    try:
        return client.filters(model, timeout=timeout), ""
    except ClassifierError as exc:
        if exc.code == grpc.StatusCode.UNIMPLEMENTED:
            return None, "not offered by this server"
        return None, f"failed: {exc}"


def _explain(client: ClassifierClient, pixels: np.ndarray, model: str, layer: str, timeout: float | None):
    """(explanation, note): the server's saliency and Grad-CAM maps for the top class, or why not."""
    try:
        return client.explain([pixels], model=model, layer=layer, timeout=timeout)[0], ""
    except ClassifierError as exc:
        if exc.code == grpc.StatusCode.UNIMPLEMENTED:
            return None, "not offered by this server"
        return None, f"failed: {exc}"


def write_page(out_dir: str | Path, image_name: str, pixels: np.ndarray, views: Sequence[ModelView]) -> Path:
    """Writes ``<out_dir>/<image stem>.html``; returns its path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{Path(image_name).stem}.html"
    path.write_text(render_page(image_name, pixels, views), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------- the page
def render_page(image_name: str, pixels: np.ndarray, views: Sequence[ModelView]) -> str:
    rows: list[list[str]] = [[_answer_cell(v, pixels) for v in views],
                             [_explanation_cell(v, pixels) for v in views]]
    for name in merged_layer_order([[l.name for l in v.layers] for v in views]):
        rows.append([_layer_cell(v, name, pixels) for v in views])
    cells = "\n".join(cell for row in rows for cell in row)
    title = f"{Path(image_name).name}: " + ", ".join(f"{v.info.name} says {v.result.label}" for v in views)
    return PAGE.format(title=_e(title), columns=len(views), cells=cells)


def merged_layer_order(orders: Sequence[Sequence[str]]) -> list[str]:
    """Every layer name of every model once, each model's own order kept: a layer one model lacks
    (a residual stage's conv3, say) goes after the layer it follows there."""
    merged: list[str] = []
    for order in orders:
        at = 0
        for name in order:
            if name in merged:
                at = merged.index(name) + 1
            else:
                merged.insert(at, name)
                at += 1
    return merged


def _answer_cell(view: ModelView, pixels: np.ndarray) -> str:
    """The model, the input as it saw it, and its top-k bars."""
    info = view.info
    acc = f"{100 * info.validation_accuracy:.2f}% validation accuracy" if info.validation_images else "not validated"
    h, w = pixels.shape[:2]
    bars = "".join(
        f'<li><span class="label">{_e(p.label)}</span><span class="bar"><span style="width:{100 * p.probability:.1f}%">'
        f'</span></span><span class="pct">{100 * p.probability:.1f}%</span></li>' for p in view.result.top_k)
    return (f'<header class="model" data-model="{_e(info.name)}"><h2>{_e(info.name)}</h2>'
            f'<p>pooling {_e(info.pooling.kind)}, window {info.pooling.window}, stride {info.pooling.stride}; '
            f'{acc}; {info.parameters:,} parameters</p>'
            f'<div class="input"><figure>{_img(enlarge(pixels, INPUT_SCALE), "input image")}'
            f'<figcaption>input: 3 x {h} x {w}, shown {INPUT_SCALE}x</figcaption></figure>'
            f'<ol class="topk" data-top="{_e(view.result.label)}">{bars}</ol></div></header>')


def _layer_cell(view: ModelView, name: str, pixels: np.ndarray) -> str:
    index = next((i for i, l in enumerate(view.layers) if l.name == name), None)
    if index is None:
        return f'<div class="absent">no {_e(name)} in {_e(view.info.name)}</div>'
    layer = view.layers[index]
    before = tuple(view.layers[index - 1].output_shape) if index else (3, *pixels.shape[:2])
    fmap = view.result.feature_maps[name]
    notes = _notes(view, layer, before)
    if layer.kind == "fc":
        body = _scores(view, fmap) + _contributions(view, index)
    else:
        channels, h, w = as_volume(fmap).shape
        scale = tile_scale(h, w, channels, COLUMN_PX)
        pixels_grid, per_tile = grid(fmap, scale)
        scale_note = "each tile over its own range" if per_tile else "one range for the layer"
        body = (f'{_img(pixels_grid, f"{name} feature maps")}'
                f'<p class="scale">black..white: {scale_note} ({float(fmap.min()):.3g} to {float(fmap.max()):.3g}); '
                f'{scale}x nearest-neighbour</p>')
        body = _filter_figure(view, name, fmap) + body + _downsampling(view, index)
    return (f'<section class="layer" data-layer="{_e(name)}" data-kind="{_e(layer.kind)}">'
            f'<h3>{_e(name)} <span class="kind">{_e(layer.kind)}</span> '
            f'<span class="shape">{shape_text(layer.output_shape)}</span></h3>{notes}{body}</section>')


def _notes(view: ModelView, layer, before: tuple[int, ...]) -> str:
    """The rule a layer applied to the volume's size, for the steps that change it."""
    out = tuple(layer.output_shape)
    if layer.kind in DOWNSAMPLING and len(before) == 3:
        w, f, s = before[2], layer.kernel, layer.stride
        p = view.info.pooling.padding if layer.kind == "conv_downsample" else 0
        exact = (w - f + 2 * p) % s == 0
        rule = f"(W - F + 2P) / S + 1 = ({w} - {f} + {2 * p})" if p else f"(W - F) / S + 1 = ({w} - {f})"
        depth = f"depth unchanged: {out[0]}" if out[0] == before[0] else f"depth {before[0]} to {out[0]}"
        return (f'<p class="rule">size rule: {rule} / {s} + 1 = {out[2]}'
                f'{"" if exact else " (rounded down)"}; {depth}</p>')
    if layer.kind.startswith("global_"):
        how = "largest" if "max" in layer.kind else "mean"
        return f'<p class="rule">each channel\'s {before[1]} x {before[2]} map to its {how} value: {shape_text(out)}</p>'
    if layer.kind == "flatten":
        return f'<p class="rule">flatten: {shape_text(before)} to one vector of {out[0]}</p>'
    if layer.kind == "fc":
        return (f'<p class="rule">fully connected: {before[0]} inputs to {out[0]} class scores (logits; '
                f'softmax makes them the probabilities above)</p>')
    return ""


def _scores(view: ModelView, logits: np.ndarray) -> str:
    names = list(view.info.class_names)
    top = int(np.argmax(logits))
    span = float(np.abs(logits).max()) or 1.0
    rows = "".join(
        f'<tr class="{"top" if i == top else ""}"><td>{_e(names[i] if i < len(names) else str(i))}</td>'
        f'<td class="num">{v:+.2f}</td><td class="signed"><span class="{"pos" if v >= 0 else "neg"}" '
        f'style="width:{50 * abs(v) / span:.1f}%"></span></td></tr>' for i, v in enumerate(map(float, logits)))
    return f'<table class="scores">{rows}</table>'


def _filter_figure(view: ModelView, name: str, fmap: np.ndarray) -> str:
    """A convolution's filters: RGB patches when it reads the image's colours, else a grid per output
    channel for the channels whose maps are strongest here (all of them would be thousands of tiles)."""
    weights = (view.filters or {}).get(name)
    if weights is None or weights.weight.ndim != 4:
        note = view.filters_note if view.filters is None else ""
        return f'<p class="absent">filters: {_e(note)}</p>' if note and name == view.layers[0].name else ""
    w = np.asarray(weights.weight, dtype=np.float32)
    out, c_in, k = w.shape[0], w.shape[1], w.shape[2]
    if c_in == 3:
        caption = (f"{out} filters, 3 x {k} x {k}, as RGB, each over its own largest magnitude: grey is 0, "
                   f"brighter in a colour raises the output, darker lowers it; {RGB_SCALE}x")
        return (f'<figure class="filters" data-layer="{_e(name)}">{_img(rgb_patches(w, RGB_SCALE), f"{name} filters")}'
                f'<figcaption>{_e(caption)}</figcaption></figure>')
    shown = strongest_channels(fmap, CHANNELS_SHOWN) if np.ndim(fmap) == 3 else list(range(min(out, CHANNELS_SHOWN)))
    scale = kernel_scale(c_in, k)
    grids = "".join(f'<figure>{_img(channel_grid(w[c], scale), f"{name} filter {c}")}'
                    f'<figcaption>channel {c}</figcaption></figure>' for c in shown)
    caption = (f"{len(shown)} of {out} filters ({c_in} x {k} x {k}), the output channels strongest on this image: "
               f"one tile per input channel, red positive, blue negative, white 0, each filter over its own "
               f"largest magnitude; {scale}x")
    return (f'<div class="filters" data-layer="{_e(name)}">{grids}<p class="scale">{_e(caption)}</p></div>')


def _downsampling(view: ModelView, index: int) -> str:
    """The worked example of a pooling layer or strided convolution, on its own input's numbers."""
    layer = view.layers[index]
    if layer.kind not in DOWNSAMPLING or not index:
        return ""
    source = view.layers[index - 1].name
    weights = (view.filters or {}).get(layer.name)
    example = downsampling_example(layer.kind, view.result.feature_maps[source], view.result.feature_maps[layer.name],
                                   layer.kernel, layer.stride, None if weights is None else weights.weight)
    if example is None:
        return ""
    side = example.patch.shape[0]
    where = (f"rows {example.top}-{example.top + side - 1}, columns {example.left}-{example.left + side - 1}")
    out_where = (f"rows {example.top // example.stride}-{example.top // example.stride + 1}, columns "
                 f"{example.left // example.stride}-{example.left // example.stride + 1}")
    windows = example.window == example.stride  # non-overlapping: each number belongs to one window
    patch = _numbers(example.patch, (lambda y, x: (y // example.stride) * 2 + x // example.stride) if windows else None)
    result = _numbers(example.result, lambda y, x: y * 2 + x)
    if layer.kind == "conv_downsample":
        c_in = view.result.feature_maps[source].shape[0]
        text = (f"worked example: input channel {example.in_channel} of {_e(source)} ({where}), the one that moves "
                f"output channel {example.channel} most; times the filter's {example.window} x {example.window} slice "
                f"for it, window by window (stride {example.stride}), it adds the share shown; the shares of all "
                f"{c_in} input channels sum to the output of {_e(layer.name)} ({out_where})")
        body = (f'{patch}<span class="op">&times;</span>{_numbers(example.kernel)}<span class="op">=</span>'
                f'{_numbers(example.share, lambda y, x: y * 2 + x)}<span class="op">&Sigma; {c_in} channels</span>'
                f'{result}')
    else:
        rule = "largest" if layer.kind == "maxpool" else "mean"
        text = (f"worked example: channel {example.channel} of {_e(source)} ({where}); the {rule} of each "
                f"{example.window} x {example.window} window, stride {example.stride}, is {_e(layer.name)} "
                f"({out_where})" + ("" if windows else f"; windows of {example.window} overlap"))
        body = f'{patch}<span class="op">&rarr; {rule} &rarr;</span>{result}'
    return (f'<div class="pool-example" data-kind="{_e(layer.kind)}" data-channel="{example.channel}">'
            f'<p class="rule">{text}</p><div class="worked">{body}</div></div>')


def _numbers(values: np.ndarray, window=None) -> str:
    """A small matrix of numbers as a table; ``window(y, x)`` colours each cell by its window."""
    rows = "".join("<tr>" + "".join(
        f'<td{f" class=w{window(y, x)}" if window else ""}>{float(v):.2f}</td>' for x, v in enumerate(row)) + "</tr>"
        for y, row in enumerate(np.asarray(values, dtype=np.float32)))
    return f'<table class="numbers">{rows}</table>'


def _contributions(view: ModelView, index: int) -> str:
    """The pooled features that raised the top class's score most: value x weight, as bars."""
    weights = (view.filters or {}).get(view.layers[index].name)
    if weights is None or not index:
        return ""
    source = view.layers[index - 1].name
    features = view.result.feature_maps[source].reshape(-1)
    top = view.result.top_k[0]
    parts = contributions(features, weights.weight, top.index)
    shown, rest = parts[:BARS], parts[BARS:]
    span = max(abs(p.product) for p in shown) or 1.0
    bars = "".join(
        f'<li><span class="label">feature {p.feature}</span><span class="bar"><span class="{"pos" if p.product >= 0 else "neg"}" '
        f'style="width:{100 * abs(p.product) / span:.1f}%"></span></span>'
        f'<span class="num">{p.value:.2f} x {p.weight:+.2f} = {p.product:+.2f}</span></li>' for p in shown)
    bias = 0.0 if weights.bias is None else float(weights.bias[top.index])
    score = sum(p.product for p in parts) + bias
    return (f'<div class="contributions" data-class="{_e(top.label)}"><p class="rule">what raised {_e(top.label)} most: '
            f'the {len(shown)} largest of its {len(parts)} terms, pooled feature ({_e(source)}) x its weight</p>'
            f'<ol>{bars}</ol><p class="scale">the other {len(rest)} features add {sum(p.product for p in rest):+.2f}, '
            f'the bias {bias:+.2f}: {_e(top.label)}\'s score {score:+.2f}</p></div>')


def _explanation_cell(view: ModelView, pixels: np.ndarray) -> str:
    if view.explanation is None:
        return (f'<section class="explain" data-offered="false"><h3>Explanations</h3>'
                f'<p class="absent">saliency and Grad-CAM: {_e(view.explain_note)}</p></section>')
    e = view.explanation
    figures = "".join(
        f'<figure>{_img(overlay(pixels, m.values, INPUT_SCALE), f"{m.method} for {e.label}")}'
        f'<figcaption>{_e(m.method)} at {_e(m.layer)}</figcaption></figure>' for m in e.maps)
    return (f'<section class="explain" data-offered="true"><h3>Why {_e(e.label)} '
            f'({100 * e.probability:.1f}%)?</h3><div class="figures">{figures}</div>'
            f'<p class="scale">saliency: how much each pixel moves the {_e(e.label)} score (largest gradient '
            f'over the three colours); Grad-CAM: where the chosen layer\'s maps that raise that score fire. '
            f'Dark to yellow: low to high.</p></section>')


def _img(pixels: np.ndarray, alt: str) -> str:
    h, w = pixels.shape[:2]
    return f'<img src="{data_uri(pixels)}" width="{w}" height="{h}" alt="{_e(alt)}">'


def _e(text: str) -> str:
    return html.escape(str(text), quote=True)


PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font: 14px/1.4 system-ui, sans-serif; margin: 16px; color: #222; background: #fafafa; }}
h1 {{ font-size: 18px; }} h2 {{ margin: 0; font-size: 17px; }} h3 {{ margin: 0 0 4px; font-size: 14px; }}
.models {{ display: grid; grid-template-columns: repeat({columns}, max-content); gap: 8px 24px; align-items: start; }}
.models > * {{ box-sizing: border-box; background: #fff; border: 1px solid #ddd; border-radius: 4px; padding: 8px; max-width: 520px; }}
.kind {{ color: #666; font-weight: normal; }} .shape {{ font-family: monospace; background: #eef; padding: 0 4px; }}
.rule {{ margin: 2px 0 6px; color: #064; font-family: monospace; font-size: 12px; }}
.scale {{ margin: 2px 0; color: #666; font-size: 11px; }}
img {{ image-rendering: pixelated; display: block; }}
figure {{ margin: 0 8px 0 0; display: inline-block; vertical-align: top; }} figcaption {{ font-size: 11px; color: #666; }}
.input {{ display: flex; gap: 12px; align-items: flex-start; }} h2 + p {{ margin: 2px 0 8px; }}
.topk {{ list-style: none; padding: 0; margin: 0; }} .topk li {{ display: flex; align-items: center; gap: 6px; }}
.topk .label {{ width: 80px; }} .topk .bar {{ width: 120px; height: 12px; background: #eee; }}
.topk .bar span {{ display: block; height: 100%; background: #3a7; }} .topk li:first-child {{ font-weight: bold; }}
.scores {{ border-collapse: collapse; font-size: 12px; }} .scores td {{ padding: 0 6px; }} .scores .num {{ font-family: monospace; }}
.scores .signed {{ width: 240px; position: relative; height: 12px; }} .scores tr.top {{ font-weight: bold; }}
.scores .pos, .scores .neg {{ position: absolute; top: 2px; height: 10px; }}
.scores .pos {{ left: 50%; background: #3a7; }} .scores .neg {{ right: 50%; background: #c55; }}
.absent {{ color: #999; font-style: italic; }}
.filters figure {{ margin: 0 6px 4px 0; }} figure.filters {{ display: block; margin-bottom: 6px; }}
.worked {{ display: flex; flex-wrap: wrap; align-items: center; gap: 6px; margin-bottom: 6px; }} .op {{ color: #666; font-size: 12px; }}
.numbers {{ border-collapse: collapse; font: 11px monospace; }} .numbers td {{ border: 1px solid #ccc; padding: 1px 3px; text-align: right; }}
.numbers .w0 {{ background: #fde2e2; }} .numbers .w1 {{ background: #e2f0fd; }} .numbers .w2 {{ background: #e5f7e2; }} .numbers .w3 {{ background: #fdf5d8; }}
.contributions ol {{ list-style: none; padding: 0; margin: 0; font-size: 12px; }} .contributions li {{ display: flex; gap: 6px; align-items: center; }}
.contributions .label {{ width: 80px; }} .contributions .bar {{ width: 140px; height: 10px; }} .contributions .num {{ font-family: monospace; }}
.contributions .bar span {{ display: block; height: 100%; }} .contributions .pos {{ background: #3a7; }} .contributions .neg {{ background: #c55; }}
</style></head>
<body><h1>{title}</h1>
<div class="models">
{cells}
</div></body></html>
"""
