"""The GPU sweep that chose the shipped models: several candidates trained side by side on one GPU.

    python -m model.sweep --out-dir runs/sweep --budget 330

It first times a few training steps of the student and the teacher on this GPU and picks the epochs
(at most ``--epochs``) and the number of candidates so that both phases fit the budget. Phase 1 trains,
concurrently (small CNNs leave one GPU mostly idle, so several processes share it): the <=150 MFLOP
candidates in ``CANDIDATES`` with max and with avg pooling, and a large residual teacher. Phase 2
distils the teacher into the candidate whose max and avg variants scored best on the validation split
(mean of the two), for both poolings, if the time left allows. Each run is one
``python -m model.train`` command, so every artifact names the command that reproduces it. Selection
uses only the 5,000-image validation split; the test split is never seen. A summary goes to
``OUT_DIR/sweep.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.nn import functional as F

from cifar10_serving.model.data import DEFAULT_DATA, load_training_set
from cifar10_serving.model.network import CifarNet, NetConfig
from cifar10_serving.model.train import ARCHS

EPOCHS = 40
# name -> model.train arguments (all at or under 150 MFLOP per image, both poolings are trained)
CANDIDATES = {
    "base": ["--arch", "base"],  # whitened, plain (64, 176, 176), 149 MFLOP
    "residual": ["--arch", "residual"],  # residual (32, 128, 256), 143 MFLOP
    "plain": ["--arch", "plain"],  # plain (64, 128, 256), 136 MFLOP
    "mid": ["--widths", "48,112,224", "--residual"],  # residual, 135 MFLOP
}
TEACHER = ["--arch", "large"]  # residual (128, 256, 512), 762 MFLOP
TRAIN_IMAGES = 45_000
STARTUP = 25.0  # seconds a run spends outside its epochs (imports, data, evaluation, export)


def train_images_per_second(arch: str, device: torch.device, batch: int = 512, steps: int = 20) -> float:
    """Training throughput of one process alone on ``device`` (synthetic batch, bf16 autocast)."""
    widths, residual, whiten = ARCHS[arch]
    net = CifarNet(NetConfig(widths=widths, residual=residual, whiten=whiten)).to(device, memory_format=torch.channels_last)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    x = torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8, device=device)
    x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,), device=device)
    t0 = 0.0
    for i in range(steps + 5):
        if i == 5:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = F.cross_entropy(net.logits(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - t0)


def plan(budget: float, student: float, teacher: float, max_epochs: int, concurrency_gain: float = 1.15):
    """(epochs, candidates) that fit: phase 1 trains 2 runs per candidate and the teacher, phase 2
    two distilled runs (each also runs the teacher forward: a third of its training cost)."""
    for n in range(len(CANDIDATES), 1, -1):
        per_epoch = TRAIN_IMAGES * ((2 * n + 2) / student + (1 + 2 / 3) / teacher) / concurrency_gain
        epochs = int((budget - 2 * STARTUP) / per_epoch)
        if epochs >= max_epochs or n == 2:
            return max(8, min(max_epochs, epochs)), list(CANDIDATES)[:n]


class Job:
    def __init__(self, name: str, args: list[str], out_dir: Path, common: list[str]) -> None:
        self.name, self.out = name, out_dir / f"{name}.pt"
        self.log = out_dir / f"{name}.log"
        self.argv = [sys.executable, "-m", "cifar10_serving.model.train", *args, *common, "--name", name, "--out", str(self.out)]
        self.proc: subprocess.Popen | None = None
        self.started = self.ended = 0.0

    def start(self) -> None:
        self.started = time.monotonic()
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT)
        print(f"[{time.strftime('%H:%M:%S')}] start {self.name}: {' '.join(self.argv[2:])}", flush=True)

    def poll(self) -> bool:
        if self.proc is None or self.proc.poll() is None:
            return False
        if not self.ended:
            self.ended = time.monotonic()
            print(f"[{time.strftime('%H:%M:%S')}] end {self.name}: rc {self.proc.returncode}, "
                  f"{self.ended - self.started:.0f} s, {self.result()}", flush=True)
        return True

    def result(self) -> dict | None:
        path = self.out.with_suffix(".json")
        if not path.exists():
            return None
        m = json.loads(path.read_text())
        v = m["metadata"]["validation"]
        return {"accuracy": v["accuracy"], "accuracy_flip_tta": v["accuracy_flip_tta"],
                "flops": m["metadata"]["flops_per_image"], "seconds": m["train_seconds"]}


def run_all(jobs: list[Job], deadline: float) -> None:
    for job in jobs:
        job.start()
    while not all(job.poll() for job in jobs):
        if time.monotonic() > deadline:
            for job in jobs:
                if not job.poll():
                    print(f"deadline: stopping {job.name}", flush=True)
                    job.proc.kill()
            break
        time.sleep(1.0)


def common_args(args, *extra: str) -> list[str]:
    """The model.train arguments every run of a sweep shares."""
    device = ["--device", args.device] if args.device else []
    return ["--data", args.data, "--cache-dir", args.cache_dir, "--no-progress", "--val-per-class",
            str(args.val_per_class), *device, *extra]


def run_grid(grid: dict, args, out_dir: Path, deadline: float, t0: float) -> int:
    common = common_args(args)
    jobs = [Job(f"{name}-{pool}", [*cand, "--pool", pool], out_dir, common)
            for name, cand in grid.items() for pool in ("max", "avg")]
    run_all(jobs, deadline)
    summary = {"grid": grid, "results": {job.name: job.result() for job in jobs}, "seconds": time.monotonic() - t0}
    (out_dir / "sweep.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary["results"], indent=1), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m model.sweep", description=__doc__.split("\n")[0])
    p.add_argument("--data", default=str(DEFAULT_DATA))
    p.add_argument("--cache-dir", default=".cache")
    p.add_argument("--out-dir", default="runs/sweep")
    p.add_argument("--budget", type=float, default=330, help="seconds for the whole sweep")
    p.add_argument("--epochs", type=int, default=EPOCHS)
    p.add_argument("--val-per-class", type=int, default=500)
    p.add_argument("--device", default=None, help="passed to model.train (default: cuda when available)")
    p.add_argument("--grid", default=None,
                   help="JSON file {name: [model.train arguments]}: train these, max and avg each, side by side, "
                        "instead of the two phases")
    args = p.parse_args(argv)
    t0 = time.monotonic()
    deadline = t0 + args.budget
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    load_training_set(args.data, cache_dir=args.cache_dir)  # decode once; the runs read the cache
    if args.grid:
        return run_grid(json.loads(Path(args.grid).read_text()), args, out_dir, deadline, t0)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    summary: dict = {}
    epochs, candidates = args.epochs, list(CANDIDATES)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        student, teacher_rate = train_images_per_second("base", device), train_images_per_second("large", device)
        epochs, candidates = plan(deadline - time.monotonic(), student, teacher_rate, args.epochs)
        summary["calibration"] = {"student_img_s": student, "teacher_img_s": teacher_rate}
        torch.cuda.empty_cache()
    summary["plan"] = {"epochs": epochs, "candidates": candidates}
    print(f"plan: {summary}", flush=True)
    # the recipe of the first sweep (before cutout and 4-pixel shifts became model.train's defaults)
    common = common_args(args, "--epochs", str(epochs), "--translate", "2", "--cutout", "0")

    phase1 = [Job("teacher-max", [*TEACHER, "--pool", "max"], out_dir, common)]
    for name in candidates:
        cand = CANDIDATES[name]
        phase1 += [Job(f"{name}-{pool}", [*cand, "--pool", pool], out_dir, common) for pool in ("max", "avg")]
    run_all(phase1, deadline)
    summary["phase1"] = {job.name: job.result() for job in phase1}

    scores = {}
    for name in candidates:
        pair = [summary["phase1"].get(f"{name}-{pool}") for pool in ("max", "avg")]
        if all(pair):
            scores[name] = (pair[0]["accuracy"] + pair[1]["accuracy"]) / 2
    summary["phase1_scores"] = scores
    teacher = out_dir / "teacher-max.pt"
    if scores and teacher.exists():
        best = max(scores, key=scores.get)
        took = max(job.ended - job.started for job in phase1 if job.name.startswith(best + "-"))
        left = deadline - time.monotonic()
        summary["phase2_candidate"], summary["phase2_time_left"] = best, left
        if left > 1.1 * took:  # two runs share the GPU now instead of seven: faster than phase 1's
            kd = ["--teacher", str(teacher), "--kd-weight", "0.5"]
            phase2 = [Job(f"{best}-kd-{pool}", [*CANDIDATES[best], *kd, "--pool", pool], out_dir, common)
                      for pool in ("max", "avg")]
            run_all(phase2, deadline)
            summary["phase2"] = {job.name: job.result() for job in phase2}
        else:
            print(f"phase 2 skipped: {left:.0f} s left, phase 1 took {took:.0f} s", flush=True)
    summary["seconds"] = time.monotonic() - t0
    (out_dir / "sweep.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1), flush=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
