"""Where a forward pass loses its speed inside the server: the same pass alone, beside a second pass,
and inside the loaded server, in one run.

    python -m bench.pass_cost                       # base-max from .cache/compiled/ (bench.compiled makes it)
    python -m bench.pass_cost --callers 32 --duration 10

Three figures per runtime (TorchScript, and the compiled package where one sits beside the file),
in ms per pass at the batch the loaded server formed:
- alone: one thread, the other core idle (the raw figure of bench.bench and bench.compiled);
- paired: two threads each running such passes at once, one torch thread each: what the server's two
  instances do to each other (memory bandwidth, caches, the second core) with no server around;
- served: the server's own compute histogram (``cifar10_compute_duration_seconds``: copy in, pass,
  copy out) over a window of ``--callers`` single-PNG callers from one client process on one
  connection; its mean batch is the batch the first two are measured at.
What is left between paired and served is what the event loop, decoding and the client take from
the passes' cores.
"""

from __future__ import annotations

import argparse
import asyncio
import threading
import time
from pathlib import Path

import grpc

from cifar10_serving.protos.cifar10.v1 import classifier_pb2_grpc as pb_grpc
from cifar10_serving.server.launcher import ServerProcess

from bench.inputs import ROOT, make_requests
from bench.load import closed_loop, unary_calls
from bench.servers import echo_problems, server_args


def pass_ms(module, batch: int, seconds: float, pairs: int = 1) -> float:
    """Mean ms per pass of ``module`` at ``batch`` on one torch thread, in ``pairs`` threads at once."""
    import torch

    times: list[float] = []
    lock = threading.Lock()
    start = threading.Barrier(pairs)

    def run() -> None:
        torch.set_num_threads(1)
        x = torch.zeros(batch, 3, 32, 32, dtype=torch.uint8)
        with torch.inference_mode():
            for _ in range(3):
                module(x)
            start.wait()
            n, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < seconds:
                module(x)
                n += 1
            with lock:
                times.append(1000 * (time.perf_counter() - t0) / n)

    threads = [threading.Thread(target=run) for _ in range(pairs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(times) / len(times)


async def drive(server: ServerProcess, model: str, callers: int, warmup: float, duration: float) -> dict:
    names = ("cifar10_compute_duration_seconds_sum", "cifar10_compute_duration_seconds_count",
             "cifar10_batch_size_images_sum")
    async with grpc.aio.insecure_channel(server.target) as channel:
        calls = unary_calls(pb_grpc.ClassifierStub(channel), make_requests("png", 1, model))
        before: list[float] = []

        async def opened() -> None:  # the window's first reading, after the warm-up
            await asyncio.sleep(warmup)
            before.extend(server.metric_sum(n, model=model) for n in names)

        result, _ = await asyncio.gather(closed_loop(calls, callers, warmup, duration), opened())
    seconds, passes, images = (server.metric_sum(n, model=model) - b for n, b in zip(names, before))
    return {"img_per_s": result["img_per_s"], "pass_ms": 1000 * seconds / passes, "batch": images / passes}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.pass_cost", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="base-max")
    p.add_argument("--folder", default=str(ROOT / ".cache" / "compiled"),
                   help="FOLDER/MODEL/MODEL.pt (and .pt2), as bench.compiled leaves them")
    p.add_argument("--callers", type=int, default=32)
    p.add_argument("--warmup", type=float, default=3.0)
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--seconds", type=float, default=3.0, help="per raw figure")
    args = p.parse_args(argv)
    import torch

    from cifar10_serving.server.models import load_artifact

    folder = Path(args.folder) / args.model
    pt = folder / f"{args.model}.pt"
    model = load_artifact(pt, torch.device("cpu"), compiled_runners=2)
    runtimes = [("torchscript", model.module, 0)] + ([("compiled", model.compiled, 1)] if model.compiled else [])
    for name, module, min_batch in runtimes:
        with ServerProcess(server_args(str(folder), default_model=args.model, compiled_min_batch=min_batch,
                                       compiled_min_batch_wide=min_batch or None), on_line=echo_problems) as server:
            served = asyncio.run(drive(server, args.model, args.callers, args.warmup, args.duration))
        batch = max(1, round(served["batch"]))
        alone = pass_ms(module, batch, args.seconds)
        paired = pass_ms(module, batch, args.seconds, pairs=2)
        print(f"{name:<12} c={args.callers}: {served['img_per_s']:.0f} img/s, mean batch {served['batch']:.1f}; "
              f"ms per pass of {batch}: alone {alone:.1f}, paired {paired:.1f} ({paired / alone:.2f}x), "
              f"served {served['pass_ms']:.1f} ({served['pass_ms'] / alone:.2f}x)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
