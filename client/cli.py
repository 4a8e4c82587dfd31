"""Command line over the client library: ``cifar10-client`` (or ``python -m client``).

    cifar10-client classify examples/cat.jpg             # top-5 table
    cifar10-client classify examples/*.jpg --json        # for machines
    cifar10-client classify examples/cat.jpg --model small-max --version 2
    cifar10-client classify examples/cat.jpg --features '*' --save-features maps/
    cifar10-client inspect examples/cat.jpg --models base-max,base-avg --out inspect/   # one HTML page
    cifar10-client layers                                # what each layer does to the volume
    cifar10-client models
    cifar10-client health                                # exit 0 only when SERVING
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Sequence

from cifar10_serving.client._client import DEFAULT_TARGET, Classification, ClassifierClient, ClassifierError
from cifar10_serving.client._credentials import tls_credentials
from cifar10_serving.client.featuremaps import save_feature_maps
from cifar10_serving.client.inspect_page import gather, load_input, write_page
from cifar10_serving.client.server_text import inside, printable

ENV_TARGET = "CIFAR10_TARGET"
ENV_CA_CERT, ENV_CLIENT_CERT, ENV_CLIENT_KEY = "CIFAR10_CA_CERT", "CIFAR10_CLIENT_CERT", "CIFAR10_CLIENT_KEY"
ENV_TOKEN, ENV_TOKEN_FILE = "CIFAR10_TOKEN", "CIFAR10_TOKEN_FILE"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cifar10-client", description="Talk to a CIFAR-10 classification server.")
    p.add_argument("--target", default=None, help=f"server host:port (env {ENV_TARGET}, default {DEFAULT_TARGET})")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds per call")
    p.add_argument("--ca-cert", default=None, metavar="PEM",
                   help=f"speak TLS and trust this CA (env {ENV_CA_CERT}); see --tls")
    p.add_argument("--tls", action="store_true", help="speak TLS, trusting the system's CAs")
    p.add_argument("--client-cert", default=None, metavar="PEM",
                   help=f"client certificate for mutual TLS (env {ENV_CLIENT_CERT})")
    p.add_argument("--client-key", default=None, metavar="PEM", help=f"its private key (env {ENV_CLIENT_KEY})")
    p.add_argument("--token-file", default=None, metavar="FILE",
                   help=f"send the bearer token in FILE (env {ENV_TOKEN_FILE}, or the token itself in {ENV_TOKEN})")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("classify", help="classify image files (PNG or JPEG)")
    c.add_argument("images", nargs="+", type=Path)
    c.add_argument("--model", default="", help="model name (default: the server's default)")
    c.add_argument("--version", default="", help="one ready version of the model (default: its latest; "
                                                 "'models' lists them)")
    c.add_argument("--top-k", type=int, default=5)
    c.add_argument("--features", nargs="+", default=[], metavar="LAYER",
                   help="layers whose feature maps to fetch; '*' for all")
    c.add_argument("--save-features", type=Path, default=None, metavar="DIR",
                   help="write each feature map as a PNG grid under DIR/<image name>/<layer>.png, the layer's "
                        "name made a safe file name (a/b: a_b.png)")
    c.add_argument("--no-resize", action="store_true", help="refuse images that are not 32x32")
    c.add_argument("--json", action="store_true", help="print JSON")

    i = sub.add_parser("inspect", help="one HTML page: the image through every layer of each model, and why")
    i.add_argument("image", type=Path)
    i.add_argument("--models", default="", metavar="A,B",
                   help="comma-separated model names, shown side by side (default: the server's default)")
    i.add_argument("--top-k", type=int, default=5)
    i.add_argument("--layer", default="", help="Grad-CAM's layer (default: the server's, the last stage's output)")
    i.add_argument("--out", type=Path, required=True, metavar="DIR", help="write DIR/<image name>.html")

    lay = sub.add_parser("layers", help="a model's layers: kind and output shape C x H x W")
    lay.add_argument("--model", default="")
    lay.add_argument("--json", action="store_true")

    m = sub.add_parser("models", help="the loaded models")
    m.add_argument("--json", action="store_true")

    h = sub.add_parser("health", help="the standard gRPC health status; exit 0 when SERVING")
    h.add_argument("--service", default="", help="service name (default: the whole server)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    target = args.target or os.environ.get(ENV_TARGET, DEFAULT_TARGET)
    try:
        credentials, token = _security(args)
        with ClassifierClient(target, timeout=args.timeout, credentials=credentials, token=token) as client:
            return COMMANDS[args.command](client, args)
    except ClassifierError as exc:
        _say(f"error: {exc}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as exc:
        _say(f"error: {exc}", file=sys.stderr)
        return 2


def _say(line: object = "", file=None) -> None:
    """Prints one line of a table or message. Most hold strings the server sent (labels, model and layer
    names, error details), so every line goes through ``printable``: control characters are shown
    escaped, never obeyed by the terminal. ``--json`` output is printed as is: JSON escapes them itself."""
    print(printable(line), file=file or sys.stdout)


def _security(args):
    """TLS credentials (None: plaintext) and the bearer token (None: none), from flags over env."""
    env = os.environ
    ca = args.ca_cert or env.get(ENV_CA_CERT)
    cert = args.client_cert or env.get(ENV_CLIENT_CERT)
    key = args.client_key or env.get(ENV_CLIENT_KEY)
    credentials = tls_credentials(ca, cert, key) if (ca or cert or key or args.tls) else None
    token_file = args.token_file or env.get(ENV_TOKEN_FILE)
    if token_file:
        with open(token_file, encoding="utf-8") as f:
            token = f.read().strip()
    else:
        token = env.get(ENV_TOKEN) or None
    return credentials, token


def _classify(client: ClassifierClient, args) -> int:
    layers = args.features
    if args.save_features and not layers:
        layers = ["*"]
    results = client.classify(args.images, model=args.model, version=args.version, top_k=args.top_k, layers=layers,
                              resize=not args.no_resize)
    saved: dict[str, list[str]] = {}
    if args.save_features:
        kinds = {layer.name: layer.kind for layer in client.model_info(args.model, version=args.version).layers}
        for path, result in zip(args.images, results):
            out = inside(args.save_features, args.save_features / path.stem)
            saved[str(path)] = [str(p) for p in save_feature_maps(result.feature_maps, out, kinds)]
    if args.json:
        print(json.dumps([_result_json(path, r, saved.get(str(path), [])) for path, r in zip(args.images, results)],
                         indent=1))
        return 0
    for path, result in zip(args.images, results):
        _say(f"{path}  ({result.model} version {result.version})")
        for p in result.top_k:
            bar = "#" * round(p.probability * 30)
            _say(f"  {p.label:<11} {100 * p.probability:6.2f}%  {bar}")
        for layer, fmap in result.feature_maps.items():
            _say(f"  feature map {layer:<16} {' x '.join(map(str, fmap.shape))}")
        if str(path) in saved:
            _say(f"  saved {len(saved[str(path)])} feature-map PNGs under {args.save_features / path.stem}")
    return 0


def _result_json(path: Path, result: Classification, saved: list[str]) -> dict:
    return {
        "image": str(path),
        "model": result.model,
        "version": result.version,
        "label": result.label,
        "top_k": [{"label": p.label, "index": p.index, "probability": p.probability} for p in result.top_k],
        "probabilities": [float(x) for x in result.probabilities],
        "feature_maps": {layer: list(fmap.shape) for layer, fmap in result.feature_maps.items()},
        "saved": saved,
    }


def _inspect(client: ClassifierClient, args) -> int:
    models = [m.strip() for m in args.models.split(",") if m.strip()] or [""]
    pixels = load_input(args.image)
    views = gather(client, pixels, models, top_k=args.top_k, layer=args.layer)
    page = write_page(args.out, args.image.name, pixels, views)
    for view in views:
        note = "explained" if view.explanation is not None else f"explanations {view.explain_note}"
        _say(f"{view.info.name:<14} {view.result.label:<11} {100 * view.result.top_k[0].probability:6.2f}%  "
             f"{len(view.layers)} layers; {note}")
    _say(f"wrote {page}")
    return 0


def _layers(client: ClassifierClient, args) -> int:
    info = client.model_info(args.model)
    if args.json:
        print(json.dumps([{"name": l.name, "kind": l.kind, "output_shape": list(l.output_shape), "flops": l.flops}
                          for l in info.layers], indent=1))
        return 0
    _say(f"model {info.name} (pooling: {info.pooling.kind}, window {info.pooling.window}, "
         f"stride {info.pooling.stride}); input {' x '.join(map(str, info.input.shape))} {info.input.dtype}")
    _say(f"  {'layer':<18} {'kind':<16} {'output':>14}  {'MFLOP':>7}")
    for layer in info.layers:
        shape = " x ".join(map(str, layer.output_shape))
        _say(f"  {layer.name:<18} {layer.kind:<16} {shape:>14}  {layer.flops / 1e6:7.2f}")
    _say(f"  total {info.flops_per_image / 1e6:.1f} MFLOP per image, {info.parameters:,} parameters")
    return 0


def _models(client: ClassifierClient, args) -> int:
    response = client.list_models()
    if args.json:
        print(json.dumps({"default_model": response.default_model, "models": [
            {"name": m.name, "version": m.version, "pooling": m.pooling.kind, "window": m.pooling.window,
             "validation_accuracy": m.validation_accuracy, "flops_per_image": m.flops_per_image,
             "device": m.device, "dataset": m.dataset} for m in response.models],
            "versions": [{"name": v.name, "version": v.version, "state": v.state, "reason": v.reason}
                         for v in response.versions]}, indent=1))
        return 0
    _say(f"  {'model':<14} {'version':<8} {'pooling':<9} {'val acc':>8} {'MFLOP':>7}  device")
    for m in response.models:
        star = "*" if m.name == response.default_model else " "
        acc = f"{100 * m.validation_accuracy:.2f}%" if m.validation_images else "-"
        _say(f"{star} {m.name:<14} {m.version:<8} {m.pooling.kind + ' ' + str(m.pooling.window):<9} {acc:>8} "
             f"{m.flops_per_image / 1e6:7.1f}  {m.device}")
    _say("(* default; accuracy on the held-out validation split of CIFAR-10 (JPEG))")
    others = [v for v in response.versions if v.state != "READY"]
    if others:  # versions the repository holds that do not serve now, and why
        _say("not serving:")
        for v in others:
            _say(f"  {v.name:<14} {v.version or '-':<8} {v.state or 'never loaded':<12} {v.reason}")
    return 0


def _health(client: ClassifierClient, args) -> int:
    status = client.health(args.service)
    _say(status)
    return 0 if status == "SERVING" else 1


COMMANDS = {"classify": _classify, "inspect": _inspect, "layers": _layers, "models": _models, "health": _health}

if __name__ == "__main__":
    raise SystemExit(main())
