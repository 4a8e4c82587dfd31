"""Our server beside TorchServe, serving the same model file to the same client, in alternating rounds.

    bench/peer_setup.sh                    # once: Java 17, TorchServe 0.12 in .cache/torchserve-venv
    python -m bench.peer                   # the full run, about 10-12 minutes
    python -m bench.peer --quick           # about 3 minutes, to see that it works

Both servers run on loopback the whole time; one is measured while the other idles. The client is
``bench.load``'s closed loop (one grpc.aio process, N callers spread over ``--connections`` channels)
sending single PNG images, the 10 bundled examples in turn: ``Classify`` with ``top_k=1`` to ours,
``Predictions`` of TorchServe's gRPC inference API to TorchServe.

TorchServe is run as it is run to be fast: its model archive holds ``model/artifacts/<model>.pt`` and
``bench/torchserve_handler.py`` (which freezes the module as our server does, and says what else it
does), 2 workers of 1 torch thread each, quiet (log4j2 at WARN, no access log, no metrics logs, no
system metrics; its Python workers still write a few lines per batch to the JVM, which is how their
metrics reach it), token auth off, the management API on. Its batch size is tuned per concurrency,
since its best setting at 32 callers is not 32: a short pass over ``--settings`` (the model is
registered again for each), then the best setting per concurrency is measured against ours (default
flags but ``--device cpu``) in ABBA rounds: ours, TorchServe, TorchServe, ours, ``--cycles`` times.

Prints a table (img/s and p50 the mean over rounds, p99 the worst round's; cores: the server's CPU
over the window, all its processes) and writes JSON with every round under ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc

from bench.inputs import make_requests
from bench.load import closed_loop, spread, unary_calls
from bench.procfs import machine
from bench.servers import echo_problems, server_args
from cifar10_serving.protos.cifar10.v1 import classifier_pb2_grpc as pb_grpc
from cifar10_serving.server.launcher import ServerProcess

ROOT = Path(__file__).resolve().parent.parent
PROTO = Path(__file__).with_name("torchserve_inference.proto")
HANDLER = Path(__file__).with_name("torchserve_handler.py")
DEFAULT_VENV = ROOT / ".cache" / "torchserve-venv"
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 64 << 20), ("grpc.use_local_subchannel_pool", 1)]
PORT_NAMES = ("inference", "management", "metrics", "grpc_inference", "grpc_management")

# Everything at WARN on the console, nothing to files: TorchServe's stock configuration logs every
# request (access log) and every batch's metrics, which cost up to half its throughput here.
QUIET_LOG4J2 = """<?xml version="1.0" encoding="UTF-8"?>
<Configuration>
  <Appenders>
    <Console name="STDOUT" target="SYSTEM_OUT"><PatternLayout pattern="%d{ISO8601} [%-5p] %t %c - %m%n"/></Console>
  </Appenders>
  <Loggers>
    <Logger name="ACCESS_LOG" level="off"/>
    <Logger name="MODEL_METRICS" level="off"/>
    <Logger name="TS_METRICS" level="off"/>
    <Logger name="io.netty" level="error"/>
    <Logger name="org.apache" level="off"/>
    <Root level="warn"><AppenderRef ref="STDOUT"/></Root>
  </Loggers>
</Configuration>
"""


# ----------------------------------------------------------------------------- TorchServe's settings
@dataclass(frozen=True)
class Setting:
    batch_size: int
    max_batch_delay_ms: int

    @property
    def name(self) -> str:
        return "nobatch" if self.batch_size == 1 else f"batch {self.batch_size} / {self.max_batch_delay_ms} ms"


def parse_settings(text: str) -> list[Setting]:
    """``1/0,4/2,...``: batch size / max batch delay in ms, each."""
    settings = []
    for item in text.split(","):
        size, _, delay = item.partition("/")
        setting = Setting(int(size), int(delay or 0))
        if setting.batch_size < 1 or setting.max_batch_delay_ms < 0:
            raise ValueError(f"setting {item!r}: batch size must be >= 1 and delay >= 0")
        settings.append(setting)
    return settings


# ----------------------------------------------------------------------------- TorchServe, the process
def free_ports(n: int) -> list[int]:
    """``n`` distinct free loopback ports. TorchServe cannot bind port 0 and say which it got, so
    these are found first and handed to it; another process could take one in between (unlikely)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def build_mar(venv: Path, artifact: Path, model: str, store: Path, torch_threads: int) -> Path:
    """``<model>.mar`` in ``store``: the artifact file unchanged, the handler, and a model-config.yaml
    giving the handler its torch thread count."""
    store.mkdir(parents=True, exist_ok=True)
    config = store.parent / "model-config.yaml"
    config.write_text(f"handler:\n  torch_threads: {torch_threads}\n")
    subprocess.run([str(venv / "bin" / "torch-model-archiver"), "--model-name", model, "--version", "1",
                    "--serialized-file", str(artifact), "--handler", str(HANDLER), "--config-file", str(config),
                    "--export-path", str(store), "--force"], check=True)
    return store / f"{model}.mar"


class TorchServe:
    """TorchServe on free loopback ports, quiet, serving from ``store``; ready when constructed.

    It runs in its own session (the ``torchserve`` launcher in the foreground, its JVM, the Python
    workers), with TEMP pointing into ``work`` so its pid file and worker sockets are its own."""

    def __init__(self, venv: Path, work: Path, store: Path, workers: int, start_timeout: float = 180.0) -> None:
        self.ports = dict(zip(PORT_NAMES, free_ports(len(PORT_NAMES))))
        self.workers = workers
        self.registered: tuple[str, Setting] | None = None
        config, log4j, logs = work / "config.properties", work / "log4j2.xml", work / "logs"
        config.write_text(self._properties(store))
        log4j.write_text(QUIET_LOG4J2)
        logs.mkdir(exist_ok=True)
        self.log_path = work / "torchserve.log"
        env = {**os.environ, "TEMP": str(work), "LOG_LOCATION": str(logs), "METRICS_LOCATION": str(logs)}
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(
                [str(venv / "bin" / "torchserve"), "--start", "--foreground", "--ncs", "--model-store", str(store),
                 "--ts-config", str(config), "--log-config", str(log4j)],
                env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            self._wait_ready(start_timeout)
        except BaseException:
            self.stop()
            raise

    def _properties(self, store: Path) -> str:
        p = self.ports
        return "\n".join([
            f"inference_address=http://127.0.0.1:{p['inference']}",
            f"management_address=http://127.0.0.1:{p['management']}",
            f"metrics_address=http://127.0.0.1:{p['metrics']}",
            "grpc_inference_address=127.0.0.1", f"grpc_inference_port={p['grpc_inference']}",
            "grpc_management_address=127.0.0.1", f"grpc_management_port={p['grpc_management']}",
            f"model_store={store}",
            "disable_token_authorization=true",  # 0.12 demands a token from every call by default
            "enable_model_api=true",  # 0.12 refuses to register models over the API by default
            "disable_system_metrics=true",  # else it starts a process to sample CPU and memory every minute
            "number_of_gpu=0",  # the comparison is on the CPU, as ours runs with --device cpu
            f"default_workers_per_model={self.workers}",
            ""])

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"TorchServe exited with status {self.proc.returncode}; "
                                   f"its log ends:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.ports['inference']}/ping", timeout=5):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"TorchServe not up within {timeout:.0f}s; its log ends:\n{self.log_tail()}")
                time.sleep(0.5)

    def log_tail(self, lines: int = 40) -> str:
        return "".join(self.log_path.read_text(errors="replace").splitlines(keepends=True)[-lines:])

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.ports['grpc_inference']}"

    @property
    def session(self) -> int:
        return self.proc.pid

    def _manage(self, method: str, path: str) -> str:
        request = urllib.request.Request(f"http://127.0.0.1:{self.ports['management']}{path}", method=method)
        try:
            with urllib.request.urlopen(request, timeout=300) as response:
                return response.read().decode()
        except urllib.error.HTTPError as exc:
            raise RuntimeError(f"TorchServe {method} {path}: {exc.code} {exc.read().decode(errors='replace')}\n"
                               f"its log ends:\n{self.log_tail()}") from exc

    def register(self, model: str, setting: Setting) -> None:
        """Serves ``model`` with ``setting``, replacing the registration before: TorchServe fixes a
        model's batch size when it is registered. Returns once its workers are up."""
        if self.registered == (model, setting):
            return
        if self.registered is not None:
            self._manage("DELETE", f"/models/{self.registered[0]}")
            self.registered = None
        self._manage("POST", f"/models?url={model}.mar&model_name={model}&batch_size={setting.batch_size}"
                             f"&max_batch_delay={setting.max_batch_delay_ms}&initial_workers={self.workers}"
                             "&synchronous=true")
        self.registered = (model, setting)

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM to its process group (the JVM stops its workers), SIGKILL to what is left after ``timeout``."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + timeout
            while session_processes(self.session) and time.monotonic() < deadline:
                time.sleep(0.2)
            if not session_processes(self.session):
                break
        self.proc.wait(10)

    def __enter__(self) -> TorchServe:
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()


# ----------------------------------------------------------------------------- the client side
def compile_protos(out: Path):
    """(pb2, pb2_grpc) of ``torchserve_inference.proto``, compiled now into ``out``."""
    from grpc_tools import protoc

    out.mkdir(parents=True, exist_ok=True)
    include = Path(protoc.__file__).parent / "_proto"  # google/protobuf/empty.proto
    rc = protoc.main(["protoc", f"-I{PROTO.parent}", f"-I{include}", f"--python_out={out}",
                      f"--grpc_python_out={out}", str(PROTO)])
    if rc != 0:
        raise RuntimeError(f"protoc failed on {PROTO} (exit status {rc})")
    sys.path.insert(0, str(out))  # the generated _grpc module imports its _pb2 by its bare name
    return (importlib.import_module(f"{PROTO.stem}_pb2"), importlib.import_module(f"{PROTO.stem}_pb2_grpc"))


def predictions_calls(stub, requests):
    """As ``bench.load.unary_calls``, for TorchServe's Predictions: one image per call."""
    counter = [0]

    async def make():
        async def call() -> int:
            counter[0] += 1
            await stub.Predictions(requests[counter[0] % len(requests)], timeout=30)
            return 1
        return call
    return make


def session_processes(session: int) -> dict[int, int]:
    """pid -> CPU ticks used (user + system) of each live process in ``session``: a server and all it started."""
    found = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            fields = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        if int(fields[3]) == session and fields[0] != "Z":
            found[int(entry.name)] = int(fields[11]) + int(fields[12])
    return found


def session_cpu_seconds(session: int) -> float:
    return sum(session_processes(session).values()) / os.sysconf("SC_CLK_TCK")


async def cores_busy(session: int, warmup: float, duration: float) -> float:
    """The session's CPU over the measurement window of a ``closed_loop`` started at the same time."""
    await asyncio.sleep(warmup)
    cpu0, t0 = session_cpu_seconds(session), time.perf_counter()
    await asyncio.sleep(duration)
    return (session_cpu_seconds(session) - cpu0) / (time.perf_counter() - t0)


@dataclass
class Round:
    phase: str  # tune (TorchServe's settings) or measure (the ABBA rounds)
    server: str  # ours or torchserve
    setting: str  # ours: its flags; torchserve: nobatch or batch N / D ms
    concurrency: int
    index: int  # the round's place in its phase, from 0
    img_per_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    errors: int
    requests: int
    seconds: float
    cores_busy: float
    load_1min: float  # the machine's load average as the round ended: others' work shows here


class Bench:
    """Both servers, their channels and callers; ``measure`` runs one window against one of them."""

    def __init__(self, args, ours: ServerProcess, torchserve: TorchServe, ts_pb2, ts_grpc) -> None:
        self.args, self.ours, self.torchserve = args, ours, torchserve
        self.ours_channels = [grpc.aio.insecure_channel(ours.target, options=CHANNEL_OPTIONS)
                              for _ in range(args.connections)]
        self.ts_channels = [grpc.aio.insecure_channel(torchserve.target, options=CHANNEL_OPTIONS)
                            for _ in range(args.connections)]
        self.ours_requests = make_requests("png", 1, args.model)
        self.ts_requests = [ts_pb2.PredictionsRequest(model_name=args.model, input={"data": r.images[0].encoded})
                            for r in self.ours_requests]
        self.ours_stubs = [pb_grpc.ClassifierStub(c) for c in self.ours_channels]
        self.ts_stubs = [ts_grpc.InferenceAPIsServiceStub(c) for c in self.ts_channels]
        self.rounds: list[Round] = []

    async def close(self) -> None:
        for channel in self.ours_channels + self.ts_channels:
            await channel.close()

    async def agreement(self) -> dict:
        """Each example through both servers once: the same top-1 label, scores within a float's noise."""
        labels, worst = 0, 0.0
        for ours_request, ts_request in zip(self.ours_requests, self.ts_requests):
            ours = (await self.ours_stubs[0].Classify(ours_request, timeout=30)).results[0]
            theirs = json.loads((await self.ts_stubs[0].Predictions(ts_request, timeout=30)).prediction)
            labels += ours.top_k[0].label == theirs["label"]
            worst = max(worst, max(abs(a - b) for a, b in zip(ours.probabilities, theirs["probabilities"])))
        return {"images": len(self.ours_requests), "same_label": labels, "max_probability_difference": worst}

    async def measure(self, phase: str, server: str, setting: str, concurrency: int,
                      warmup: float, duration: float) -> Round:
        if server == "ours":
            make = spread([unary_calls(s, self.ours_requests) for s in self.ours_stubs])
            session = self.ours.pid
        else:
            make = spread([predictions_calls(s, self.ts_requests) for s in self.ts_stubs])
            session = self.torchserve.session
        cores = asyncio.ensure_future(cores_busy(session, warmup, duration))
        result = await closed_loop(make, concurrency, warmup, duration)
        index = sum(r.phase == phase for r in self.rounds)
        r = Round(phase, server, setting, concurrency, index, result["img_per_s"], result["p50_ms"], result["p90_ms"],
                  result["p99_ms"], result["errors"], result["requests"], result["seconds"], await cores,
                  os.getloadavg()[0])
        self.rounds.append(r)
        print(f"  {phase:<7} c={concurrency:<3} {server:<10} {setting:<18} {r.img_per_s:7.0f} img/s  "
              f"p50 {r.p50_ms:6.2f} ms  p99 {r.p99_ms:6.2f} ms  errors {r.errors}  cores {r.cores_busy:4.2f}  "
              f"load {r.load_1min:.1f}", flush=True)
        return r

    async def tune(self, settings: list[Setting]) -> dict[int, Setting]:
        """Each setting registered once and measured at every concurrency; the best per concurrency."""
        a = self.args
        best: dict[int, tuple[float, Setting]] = {}
        for setting in settings:
            self.torchserve.register(a.model, setting)
            for c in a.concurrency:
                r = await self.measure("tune", "torchserve", setting.name, c, a.tune_warmup, a.tune_seconds)
                score = 0.0 if r.errors else r.img_per_s  # a setting that fails calls is no candidate
                if c not in best or score > best[c][0]:
                    best[c] = (score, setting)
        return {c: s for c, (_, s) in best.items()}

    async def compare(self, best: dict[int, Setting]) -> None:
        """Per concurrency, ABBA rounds of ours against TorchServe at its best setting there."""
        a = self.args
        for c in a.concurrency:
            self.torchserve.register(a.model, best[c])
            order = ["ours", "torchserve", "torchserve", "ours"] * a.cycles
            for server in order:
                setting = a.ours_label if server == "ours" else best[c].name
                await self.measure("measure", server, setting, c, a.warmup, a.seconds)


# ----------------------------------------------------------------------------- the report
def summarize(rounds: list[Round]) -> list[dict]:
    """Per concurrency and server, over the measurement rounds: mean img/s and p50, worst p99."""
    out = []
    keys = sorted({(r.concurrency, r.server) for r in rounds if r.phase == "measure"},
                  key=lambda k: (k[0], k[1] != "ours"))  # ours first at each concurrency
    for c, server in keys:
        rs = [r for r in rounds if r.phase == "measure" and (r.concurrency, r.server) == (c, server)]
        out.append({"concurrency": c, "server": server, "setting": rs[0].setting, "rounds": len(rs),
                    "img_per_s": sum(r.img_per_s for r in rs) / len(rs),
                    "p50_ms": sum(r.p50_ms for r in rs) / len(rs), "p99_ms": max(r.p99_ms for r in rs),
                    "errors": sum(r.errors for r in rs), "cores_busy": sum(r.cores_busy for r in rs) / len(rs),
                    "round_img_per_s": [round(r.img_per_s, 1) for r in rs]})
    for row in out:
        ts = next((o for o in out if o["concurrency"] == row["concurrency"] and o["server"] == "torchserve"), None)
        if row["server"] == "ours" and ts and ts["img_per_s"]:
            row["ratio_to_torchserve"] = row["img_per_s"] / ts["img_per_s"]
    return out


def table(summary: list[dict], rounds: list[Round]) -> str:
    tuned = {}
    for r in rounds:
        if r.phase == "tune":
            tuned.setdefault(r.concurrency, []).append(f"{r.setting} {r.img_per_s:.0f}")
    head = (f"{'callers':>7}  {'server':<10} {'setting':<18} {'img/s':>7} {'p50 ms':>7} {'p99 ms':>7} {'errors':>6} "
            f"{'cores':>5} {'ratio':>5}  per round img/s")  # ratio: ours over TorchServe, img/s
    rows = [head, "-" * len(head)]
    for s in summary:
        ratio = f"{s['ratio_to_torchserve']:.2f}" if "ratio_to_torchserve" in s else ""
        rows.append(f"{s['concurrency']:>7}  {s['server']:<10} {s['setting']:<18} {s['img_per_s']:>7.0f} "
                    f"{s['p50_ms']:>7.2f} {s['p99_ms']:>7.2f} {s['errors']:>6} {s['cores_busy']:>5.2f} {ratio:>5}  "
                    + " ".join(f"{v:.0f}" for v in s["round_img_per_s"]))
    rows.append("TorchServe tuning pass (img/s): " + "; ".join(f"c={c}: " + ", ".join(v) for c, v in tuned.items()))
    return "\n".join(rows)


# ----------------------------------------------------------------------------- the run
async def run(args, ours: ServerProcess, torchserve: TorchServe, ts_pb2, ts_grpc) -> dict:
    bench = Bench(args, ours, torchserve, ts_pb2, ts_grpc)
    try:
        torchserve.register(args.model, args.settings[0])
        agreement = await bench.agreement()
        print(f"agreement: {json.dumps(agreement)}", flush=True)
        if agreement["same_label"] != agreement["images"]:
            raise RuntimeError(f"the two servers disagree on top-1 labels: {agreement}")
        best = await bench.tune(args.settings)
        print("TorchServe's best setting: " + ", ".join(f"c={c}: {s.name}" for c, s in best.items()), flush=True)
        await bench.compare(best)
    finally:
        await bench.close()
    return {"agreement": agreement, "best": {c: asdict(s) for c, s in best.items()}, "rounds": bench.rounds}


def planned_seconds(args) -> float:
    """The measuring time alone; starting the servers and each registration add about a minute."""
    tuning = len(args.settings) * len(args.concurrency) * (args.tune_warmup + args.tune_seconds)
    return tuning + len(args.concurrency) * 4 * args.cycles * (args.warmup + args.seconds)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench.peer", description=__doc__.split("\n")[0])
    p.add_argument("--venv", default=os.environ.get("TORCHSERVE_VENV", str(DEFAULT_VENV)),
                   help="TorchServe's venv, made by bench/peer_setup.sh (env TORCHSERVE_VENV)")
    p.add_argument("--models-dir", default=str(ROOT / "model" / "artifacts"),
                   help="ours serves it; the .mar takes <model>.pt from it")
    p.add_argument("--model", default="base-max")
    p.add_argument("--server-args", default="--device cpu",
                   help="our server's flags, one string (default: its defaults, on the CPU as TorchServe is)")
    p.add_argument("--ts-workers", type=int, default=2, help="TorchServe workers")
    p.add_argument("--ts-threads", type=int, default=1, help="torch threads per TorchServe worker")
    p.add_argument("--settings", default="1/0,4/2,8/2,16/5,32/5",
                   help="TorchServe settings tried: batch size / max batch delay in ms, each")
    p.add_argument("--concurrency", default="1,8,32")
    p.add_argument("--connections", type=int, default=8,
                   help="client channels to each server, the callers spread over them")
    p.add_argument("--tune-warmup", type=float, default=1.0)
    p.add_argument("--tune-seconds", type=float, default=4.0, help="window per TorchServe setting and concurrency")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds before each measurement window")
    p.add_argument("--seconds", type=float, default=15.0, help="measurement window per round")
    p.add_argument("--cycles", type=int, default=2, help="ABBA cycles per concurrency (4 rounds each)")
    p.add_argument("--quick", action="store_true", help="about 3 minutes: short windows, one ABBA cycle")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = p.parse_args(argv)
    if args.quick:
        args.tune_warmup, args.tune_seconds, args.warmup, args.seconds, args.cycles = 0.5, 1.5, 1.0, 3.0, 1
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    try:
        args.settings = parse_settings(args.settings)
    except ValueError as exc:
        p.error(str(exc))
    args.server_args = shlex.split(args.server_args)
    args.models_dir = str(Path(args.models_dir).resolve())
    args.ours_label = " ".join(args.server_args) or "defaults"
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    venv = Path(args.venv)
    if not (venv / "bin" / "torchserve").exists():
        print(f"no TorchServe in {venv}: run bench/peer_setup.sh first", file=sys.stderr)
        return 2
    artifact = Path(args.models_dir) / f"{args.model}.pt"
    info = {"machine": machine(), "planned_measuring_seconds": planned_seconds(args)}
    print(json.dumps(info), flush=True)
    work = Path(tempfile.mkdtemp(prefix="peer-"))
    try:
        ts_pb2, ts_grpc = compile_protos(work / "protos")
        store = work / "store"
        build_mar(venv, artifact, args.model, store, args.ts_threads)
        with TorchServe(venv, work, store, args.ts_workers) as torchserve, \
                ServerProcess([*args.server_args, *server_args(args.models_dir)], on_line=echo_problems) as ours:
            result = asyncio.run(run(args, ours, torchserve, ts_pb2, ts_grpc))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    summary = summarize(result["rounds"])
    print(table(summary, result["rounds"]))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"peer-{time.strftime('%Y%m%d-%H%M%S')}.json"
    settings = {k: v for k, v in vars(args).items() if k != "settings"}
    settings["settings"] = [s.name for s in args.settings]
    report = {**info, "args": settings, "artifact": str(artifact), "agreement": result["agreement"],
              "best": result["best"], "summary": summary, "rounds": [asdict(r) for r in result["rounds"]]}
    path.write_text(json.dumps(report, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
