"""Fuzz the decode-and-validate path for a set time, then a live server with more of the same.

    python -m bench.fuzz                                   # 60 s in-process, then 3,000 requests
    python -m bench.fuzz --duration 600 --server-requests 20000

Inputs (bench/hostile.py): random bytes; mutations of valid PNG and JPEG files of every mode (flips,
overwrites, insertions, deletions, truncations, splices; PNG checksums repaired half the time so the
mutation reaches the decoder); PNG headers declaring any size, depth, colour type and interlace;
JPEGs declaring any size; raw tensors of any shape, dtype, layout, length and content (NaN, Inf).

In-process, each input goes through ``server.cifar10_v1.source`` and ``server.images.decode_into``:
the outcome must be a decoded
image or an ``ImageError``. Decoding runs in a child process, so a native crash (SIGSEGV in a
decoder) is caught too: it is counted, its input saved under ``--out`` (a serialised
``cifar10.v1.Image``), and a new child goes on. Through the server, a crash is any status but OK,
INVALID_ARGUMENT or NOT_FOUND, or the process dying; its memory is read before and after.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

from cifar10_serving.protos.cifar10.v1 import classifier_pb2 as pb

ROOT = Path(__file__).resolve().parent.parent

MAX_PIXELS = 4096 * 4096  # the server's default


# ----------------------------------------------------------------------------- inputs
class Inputs:
    """Endless hostile images, each with the resize mode to decode it with."""

    def __init__(self, seed: int) -> None:
        from bench import hostile  # the hostile-input makers, shared with the test suite

        self.hostile = hostile
        self.rng = np.random.default_rng(seed)
        self.seeds = list(hostile.seed_files(np.random.default_rng(seed)).values())
        self.jpeg = next(v for v in self.seeds if v[:2] == b"\xff\xd8")

    def next(self) -> tuple[str, pb.Image, int]:
        rng, h = self.rng, self.hostile
        resize = int(rng.random() < 0.2)  # RESIZE_REJECT a fifth of the time
        kind = rng.choice(["bytes", "mutated", "png-header", "jpeg-header", "raw"], p=[0.1, 0.45, 0.15, 0.1, 0.2])
        if kind == "bytes":
            return kind, pb.Image(encoded=rng.bytes(int(rng.integers(0, 4096)))), resize
        if kind == "mutated":
            data = h.mutate(self.seeds[rng.integers(len(self.seeds))], rng, int(rng.integers(1, 12)))
            return kind, pb.Image(encoded=h.fix_png_crcs(data) if rng.random() < 0.5 else data), resize
        if kind == "png-header":
            side = lambda: int(rng.choice([0, 1, 31, 32, 33, 4096, 65535, 2**31 - 1, rng.integers(1, 5000)]))
            data = h.png_declaring(side(), side(), int(rng.choice([1, 2, 4, 8, 16, 3])),
                                   int(rng.choice([0, 2, 3, 4, 6, 5])), int(rng.integers(0, 3)),
                                   rng.bytes(int(rng.integers(0, 2048))))
            return kind, pb.Image(encoded=data), resize
        if kind == "jpeg-header":
            side = lambda: int(rng.choice([0, 1, 32, 4096, 65535, rng.integers(1, 5000)]))
            return kind, pb.Image(encoded=h.jpeg_declaring(self.jpeg, side(), side())), resize
        return kind, self._raw(), resize

    def _raw(self) -> pb.Image:
        rng = self.rng
        dtype, layout = int(rng.choice([0, 1, 2, 3, 77])), int(rng.choice([0, 1, 9]))
        if rng.random() < 0.5:  # three dimensions with 3 channels where the layout puts them: reaches the values
            h, w = (int(rng.choice([1, 31, 32, 33, 97, 2**16, rng.integers(1, 300)])) for _ in range(2))
            shape = [3, h, w] if layout == 0 else [h, w, 3]
        else:
            shape = [int(rng.choice([0, 1, 3, 4, 31, 32, 33, 97, 2**16, 2**32 - 1])) for _ in range(rng.integers(0, 5))]
        itemsize = 4 if dtype == 2 else 1
        count = int(np.prod(shape, dtype=object)) if shape else 0
        nbytes = count * itemsize + int(rng.choice([0, 0, 0, -1, 1]))
        nbytes = max(0, min(nbytes, 1 << 22))
        if itemsize == 4:
            values = rng.choice([0.0, 0.5, 1.0, -0.1, 1.1, np.nan, np.inf, -np.inf], size=nbytes // 4 + 1)
            data = values.astype("<f4").tobytes()[:nbytes]
        else:
            data = rng.bytes(nbytes)
        return pb.Image(raw=pb.RawTensor(shape=shape, dtype=dtype, layout=layout, data=data))


# ----------------------------------------------------------------------------- in-process, in a child
def worker(seed: int, seconds: float, current: Path) -> None:
    """Decodes inputs until time is up; before each, writes it to ``current`` so that if the process
    dies the parent knows which input killed it. Prints a JSON summary."""
    import warnings

    from cifar10_serving.server.cifar10_v1 import RESIZE, source
    from cifar10_serving.server.images import ImageError, decode_into

    warnings.simplefilter("ignore")
    inputs, counts, crashes = Inputs(seed), Counter(), []
    out = np.empty((3, 32, 32), dtype=np.uint8)
    until = time.monotonic() + seconds
    report = time.monotonic()
    with open(current, "r+b" if current.exists() else "w+b") as f:
        while time.monotonic() < until:
            if time.monotonic() > report:  # a running tally, so a crash loses little of the count
                print(json.dumps({"counts": counts, "crashes": crashes}), flush=True)
                report = time.monotonic() + 1.0
            kind, image, resize = inputs.next()
            f.seek(0)
            f.write(resize.to_bytes(1, "little") + image.SerializeToString())
            f.truncate()
            f.flush()
            try:
                decode_into(source(image, 0), 0, out, RESIZE[resize], MAX_PIXELS)
                counts[f"{kind}: decoded"] += 1
            except ImageError:
                counts[f"{kind}: ImageError"] += 1
            except Exception as exc:  # a crash: anything else
                counts[f"{kind}: CRASH {type(exc).__name__}"] += 1
                crashes.append(f"{kind}: {type(exc).__name__}: {exc}"[:300])
    print(json.dumps({"counts": counts, "crashes": crashes}))


def fuzz_in_process(seconds: float, out: Path) -> tuple[Counter, list[str]]:
    counts, crashes = Counter(), []
    out.mkdir(parents=True, exist_ok=True)
    current = out / "current.bin"
    seed, until = 0, time.monotonic() + seconds
    while (left := until - time.monotonic()) > 1:
        seed += 1
        child = subprocess.run([sys.executable, "-m", "bench.fuzz", "--worker", str(seed), "--duration", str(left),
                                "--current", str(current)], cwd=ROOT, capture_output=True, text=True)
        reports = child.stdout.strip().splitlines()
        if reports:
            summary = json.loads(reports[-1])
            counts.update(summary["counts"])
            crashes += summary["crashes"]
        if child.returncode != 0:  # died: a native crash on the input in `current`
            saved = out / f"crash-{seed}.bin"
            saved.write_bytes(current.read_bytes())
            counts["native crash (process died)"] += 1
            crashes.append(f"worker {seed} died with {child.returncode}; input saved to {saved}; "
                           f"{child.stderr.strip().splitlines()[-1:]}")
    return counts, crashes


# ----------------------------------------------------------------------------- through a server
async def fuzz_server(target: str, requests: int, seed: int, concurrency: int = 8) -> Counter:
    import grpc

    from cifar10_serving.protos.cifar10.v1 import classifier_pb2_grpc as pb_grpc

    inputs, rng = Inputs(seed), np.random.default_rng(seed)
    valid = pb.ClassifyRequest(images=[pb.Image(encoded=inputs.seeds[0])]).SerializeToString()
    codes: Counter = Counter()
    async with grpc.aio.insecure_channel(target, options=[("grpc.max_send_message_length", 64 << 20)]) as channel:
        stub = pb_grpc.ClassifierStub(channel)
        raw_call = channel.unary_unary("/cifar10.v1.Classifier/Classify", request_serializer=None,
                                       response_deserializer=pb.ClassifyResponse.FromString)
        left = [requests]

        async def caller() -> None:
            while left[0] > 0:
                left[0] -= 1
                try:
                    if rng.random() < 0.1:  # the message itself mangled
                        await raw_call(inputs.hostile.mutate(valid, rng, int(rng.integers(1, 6))), timeout=30)
                    else:
                        images = [inputs.next()[1] for _ in range(int(rng.choice([1, 1, 1, 2, 8])))]
                        layers = list(rng.choice(["", "stage1.pool", "*", "nope"], size=rng.integers(0, 2)))
                        await stub.Classify(pb.ClassifyRequest(
                            images=images, resize=int(rng.random() < 0.2), top_k=int(rng.choice([0, 1, 5, 10, 11])),
                            feature_layers=[str(x) for x in layers if x]), timeout=30)
                    codes["OK"] += 1
                except grpc.RpcError as exc:
                    codes[exc.code().name] += 1

        await asyncio.gather(*(caller() for _ in range(concurrency)))
    return codes


# ----------------------------------------------------------------------------- main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.fuzz", description=__doc__.split("\n")[0])
    p.add_argument("--duration", type=float, default=60.0, help="seconds of in-process fuzzing")
    p.add_argument("--server-requests", type=int, default=3000, help="requests through a live server (0: skip)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "fuzz")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--current", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--replay", type=Path, default=None, help="decode one saved crash input, in this process")
    args = p.parse_args(argv)
    if args.replay is not None:
        from cifar10_serving.server.cifar10_v1 import RESIZE, source
        from cifar10_serving.server.images import decode_into

        data = args.replay.read_bytes()
        decode_into(source(pb.Image.FromString(data[1:]), 0), 0, np.empty((3, 32, 32), np.uint8), RESIZE[data[0]],
                    MAX_PIXELS)
        print("decoded without a crash")
        return 0
    if args.worker is not None:
        worker(args.worker, args.duration, args.current)
        return 0

    from bench.procfs import MiB, machine, memory_bytes, reset_peak
    from bench.servers import timed_stop
    from cifar10_serving.server.launcher import ServerProcess

    print(f"machine: {machine()}")
    start = time.monotonic()
    counts, crashes = fuzz_in_process(args.duration, args.out)
    seconds = time.monotonic() - start
    tried = sum(counts.values())
    print(f"\nin-process: {tried:,} inputs in {seconds:.0f} s ({tried / seconds:,.0f}/s) through "
          "server.cifar10_v1.source and server.images.decode_into")
    for key in sorted(counts):
        print(f"  {key:<36} {counts[key]:>9,}")
    crash_count = sum(v for k, v in counts.items() if "CRASH" in k or "native" in k)
    print(f"  crashes: {crash_count}")
    for line in crashes[:10]:
        print(f"    {line}")

    server_crashes = 0
    if args.server_requests:
        server = ServerProcess()
        try:
            before = memory_bytes(server.pid)
            reset_peak(server.pid)
            t0 = time.monotonic()
            codes = asyncio.run(fuzz_server(server.target, args.server_requests, args.seed))
            elapsed = time.monotonic() - t0
            alive, after, peak = server.alive, memory_bytes(server.pid), memory_bytes(server.pid, "VmHWM")
        finally:
            exit_seconds = timed_stop(server)
        bad = {k: v for k, v in codes.items() if k not in ("OK", "INVALID_ARGUMENT", "NOT_FOUND")}
        server_crashes = sum(bad.values()) + (not alive)
        print(f"\nthrough the server: {sum(codes.values()):,} requests in {elapsed:.0f} s, by status: "
              + ", ".join(f"{k} {v:,}" for k, v in sorted(codes.items())))
        print(f"  server alive after: {alive}; resident memory {before / MiB:.0f} MB before, {after / MiB:.0f} MB "
              f"after, peak {peak / MiB:.0f} MB; exited {exit_seconds:.1f} s after SIGTERM")
        print(f"  crashes (other statuses, or the server died): {server_crashes}")
    return 1 if crash_count or server_crashes else 0


if __name__ == "__main__":
    raise SystemExit(main())
