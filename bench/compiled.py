"""TorchScript against the compiled package (``NAME.pt2``, docs/compiled.md), raw and served, in one run.

    python -m bench.compiled                   # base-max: compiles it once into .cache/compiled/, then measures
    python -m bench.compiled --model base-conv --quick

Raw: the server's own loading (``load_artifact``: the frozen TorchScript, and the package through the
server's GIL-free runner) called in this process, batch 1 / 8 / 32 at 1 and 2 threads, scores only and
with every layer's map, measured in ABAB turns so that a drift of the machine hits both alike. Served: the server as a child
process three times, ``--compiled-min-batch 0`` (TorchScript only), the defaults (the package from
their rungs, one for one-thread passes and one for wider ones) and 1 (the package for every pass), each driven by one Python client on one connection with
single PNG images at 1 / 8 / 32 callers (``bench.load``), with the mean batch the batcher formed and
the share of passes the package ran (its /metrics). A table on stdout, JSON under ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import grpc

from cifar10_serving.protos import artifact
from cifar10_serving.protos.cifar10.v1 import classifier_pb2_grpc as pb_grpc
from cifar10_serving.server.config import DEFAULT_MODELS_DIR, ServerConfig
from cifar10_serving.server.launcher import ServerProcess

from bench.inputs import ROOT, make_requests
from bench.load import closed_loop, unary_calls
from bench.servers import echo_problems, server_args

DEFAULT_MIN_BATCH, DEFAULT_MIN_WIDE = ServerConfig.compiled_min_batch, ServerConfig.compiled_min_batch_wide


def prepare(model: str, folder: Path) -> Path:
    """``folder/model.pt`` (a copy of the bundled file) and its package, compiled unless an up-to-date one is there."""
    folder.mkdir(parents=True, exist_ok=True)
    pt = folder / f"{model}{artifact.ARTIFACT_SUFFIX}"
    shutil.copy(DEFAULT_MODELS_DIR / pt.name, pt)
    package = pt.with_suffix(artifact.COMPILED_SUFFIX)
    digest = hashlib.sha256(pt.read_bytes()).hexdigest()
    if not package.exists() or artifact.read_metadata(package).get("compiled", {}).get("source_sha256") != digest:
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "cifar10_serving.model.compile", str(pt)], check=True)
        print(f"compiled {package} in {time.perf_counter() - t0:.0f} s", flush=True)
    return pt


def raw(pt: Path, batches: list[int], threads: list[int], seconds: float) -> list[dict]:
    import torch

    from cifar10_serving.server.models import load_artifact

    model = load_artifact(pt, torch.device("cpu"), compiled_runners=1)
    layers = model.layer_names
    runtimes = {"torchscript": model.module, "compiled": model.compiled,  # scores only, and every layer's map
                "torchscript+maps": lambda x: model.module.forward_with_features(x, layers),
                "compiled+maps": lambda x: model.compiled.forward_with_features(x, layers)}
    rows = []
    for t in threads:
        torch.set_num_threads(t)
        for batch in batches:
            x = torch.zeros((batch, *model.input_shape), dtype=torch.uint8)
            rates: dict[str, list[float]] = {name: [] for name in runtimes}
            with torch.inference_mode():
                for name, module in runtimes.items():
                    for _ in range(3):
                        module(x)
                for _ in range(2):  # A B A B
                    for name, module in runtimes.items():
                        n, t0 = 0, time.perf_counter()
                        while time.perf_counter() - t0 < seconds / 2:
                            module(x)
                            n += 1
                        rates[name].append(batch * n / (time.perf_counter() - t0))
            row = {"threads": t, "batch": batch, **{name: sum(r) / len(r) for name, r in rates.items()}}
            row["ratio"] = row["compiled"] / row["torchscript"]
            row["ratio_maps"] = row["compiled+maps"] / row["torchscript+maps"]
            rows.append(row)
            print(f"  raw  threads {t}  batch {batch:<3} torchscript {row['torchscript']:7.0f} img/s  "
                  f"compiled {row['compiled']:7.0f} img/s  ({row['ratio']:.2f}x);  with every map "
                  f"{row['torchscript+maps']:7.0f} / {row['compiled+maps']:7.0f} ({row['ratio_maps']:.2f}x)", flush=True)
    return rows


async def served_levels(server: ServerProcess, model: str, callers: list[int], warmup: float, duration: float
                        ) -> list[dict]:
    rows = []
    async with grpc.aio.insecure_channel(server.target) as channel:
        stub = pb_grpc.ClassifierStub(channel)
        requests = make_requests("png", 1, model)
        for c in callers:
            before = [server.metric_sum(name, model=model) for name in
                      ("cifar10_batch_size_images_sum", "cifar10_batch_size_images_count", "cifar10_compiled_passes_total")]
            result = await closed_loop(unary_calls(stub, requests), c, warmup, duration)
            after = [server.metric_sum(name, model=model) for name in
                     ("cifar10_batch_size_images_sum", "cifar10_batch_size_images_count", "cifar10_compiled_passes_total")]
            images, passes, compiled = (a - b for a, b in zip(after, before))
            rows.append({"callers": c, "img_per_s": result["img_per_s"], "p50_ms": result["p50_ms"],
                         "p99_ms": result["p99_ms"], "errors": result["errors"],
                         "mean_batch": images / passes if passes else 0.0,
                         "compiled_share": compiled / passes if passes else 0.0})
    return rows


def served(folder: Path, model: str, callers: list[int], warmup: float, duration: float) -> dict[str, list[dict]]:
    results = {}
    for label, narrow, wide in (("torchscript", 0, None), (f"compiled {DEFAULT_MIN_BATCH}+/{DEFAULT_MIN_WIDE}+", None, None),
                                ("compiled from 1", 1, 1)):
        with ServerProcess(server_args(str(folder), default_model=model, compiled_min_batch=narrow,
                                       compiled_min_batch_wide=wide), on_line=echo_problems) as server:
            rows = asyncio.run(served_levels(server, model, callers, warmup, duration))
        results[label] = rows
        for row in rows:
            print(f"  served {label:<18} c={row['callers']:<3} {row['img_per_s']:7.0f} img/s  p50 {row['p50_ms']:6.2f} ms"
                  f"  p99 {row['p99_ms']:6.2f} ms  batch {row['mean_batch']:5.1f}  compiled {row['compiled_share']:.0%}"
                  f"  errors {row['errors']}", flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.compiled", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="base-max")
    p.add_argument("--folder", default=str(ROOT / ".cache" / "compiled"), help="where the copy and its package live")
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--callers", default="1,8,32")
    p.add_argument("--seconds", type=float, default=3.0, help="raw: per runtime, batch and thread count")
    p.add_argument("--warmup", type=float, default=3.0)
    p.add_argument("--duration", type=float, default=10.0, help="served: the measured window of each level")
    p.add_argument("--quick", action="store_true", help="1 s raw, 1 + 3 s served")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = p.parse_args(argv)
    if args.quick:
        args.seconds, args.warmup, args.duration = 1.0, 1.0, 3.0
    ints = lambda text: [int(v) for v in text.split(",")]  # noqa: E731
    folder = Path(args.folder) / args.model
    pt = prepare(args.model, folder)
    print(f"{args.model}: raw, img/s", flush=True)
    raw_rows = raw(pt, ints(args.batches), ints(args.threads), args.seconds)
    print(f"{args.model}: served, single PNG images, one connection", flush=True)
    served_rows = served(folder, args.model, ints(args.callers), args.warmup, args.duration)
    import torch

    document = {"model": args.model, "date": time.strftime("%Y-%m-%d %H:%M"), "machine": platform.processor() or
                platform.machine(), "torch": torch.__version__, "raw": raw_rows, "served": served_rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"compiled-{args.model}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(document, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
