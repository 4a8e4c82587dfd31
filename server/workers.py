"""``--workers N``: N server processes share one gRPC port, so that one Python process is not the limit.

The supervisor (the process the user started) loads no model. It picks the port, starts N copies of
``python -m cifar10_serving.server`` with the same settings, each told its ``--worker-index`` and its
own ready file, and waits:

- every worker binds the gRPC port with SO_REUSEPORT; the kernel spreads *connections* (not calls)
  across them, so a client needs several connections to use several workers (one gRPC channel is
  one connection; a load balancer in front spreads calls); the HTTP port (``--http-port``) likewise,
  reserved the same way when it is 0, so every worker serves HTTP on one port too;
- what each worker answers of the server's statistics (ModelStatistics, ``/v2/models/stats``) is the
  whole server's: before starting any, the supervisor names each worker's statistics socket in its
  private directory, and a worker asks its siblings there (``server.worker_statistics``); ModelConfig's
  instance count is every worker's instances together;
- worker i serves its own Prometheus endpoint on ``metrics_port + i`` (each its own scrape target,
  the histograms aggregate with ``sum by``); with ``--metrics-port 0`` each picks a free port;
- once every worker is SERVING, the supervisor logs one "serving" line and writes ``--ready-file``
  listing every worker's metrics port (removed again when it starts stopping);
- SIGTERM or SIGINT to the supervisor is passed on: every worker drains as a lone server does;
- a worker that dies on its own stops the rest, and the supervisor exits with status 1, for the
  process manager (Docker's restart policy, systemd) to restart the whole set;
- a supervisor that dies without passing anything on (``kill -9``, the OOM killer) takes its workers
  with it: each gets SIGTERM from the kernel (Linux ``PR_SET_PDEATHSIG``) and drains, so nothing is
  left serving on the port and a restarted supervisor can bind it again.

Why processes: one server process, not the model, can be the limit; measurements are in
bench/RESULTS.md ("Two worker processes").
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

from cifar10_serving.server.config import ServerConfig, default_torch_threads
from cifar10_serving.server.ready_file import read_ready_file, remove_ready_file, write_ready_file
from cifar10_serving.server.worker_statistics import write_worker_set

log = logging.getLogger("server.workers")

EXIT_SLACK_SECONDS = 15.0  # beyond the grace period: model teardown, interpreter exit
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _die_with(parent: int):
    """For ``preexec_fn``: in the forked child, before it runs the worker, ask the kernel for SIGTERM
    when the parent dies; if the parent died before that took effect, exit at once instead."""

    # Looked up here, in the parent: the child between fork and exec should only make the call.
    prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None

    def arm() -> None:
        if prctl is not None:
            prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent:  # the parent is already gone: the signal will never come
            os._exit(1)

    return arm


def _reserve_port(host: str) -> socket.socket:
    """A socket bound to a free port with SO_REUSEPORT and never listening: it keeps the port ours
    until the workers have bound it too, and takes no connections."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, 0))
    return sock


def worker_argv(argv: Sequence[str], config: ServerConfig, index: int, port: int, ready_file: Path,
                http_port: int | None = None) -> list[str]:
    """The command line of worker ``index``: the user's flags, then the ones that make it a worker
    (argparse keeps the last value of a repeated flag). ``http_port``: the shared HTTP port (default
    ``config.http_port``; -1 keeps HTTP off)."""
    metrics_port = config.metrics_port + index if config.metrics_port > 0 else config.metrics_port
    threads = config.torch_threads or default_torch_threads(config.workers)
    http_port = config.http_port if http_port is None else http_port
    return [sys.executable, "-m", "cifar10_serving.server", *argv, "--workers", "1", "--worker-index", str(index),
            "--port", str(port), "--http-port", str(http_port), "--metrics-port", str(metrics_port),
            "--torch-threads", str(threads), "--ready-file", str(ready_file)]


def ready_document(config: ServerConfig, port: int, workers: list[dict[str, Any]]) -> dict[str, Any]:
    """The supervisor's ready file: a lone server's fields (server/main.py), every worker's metrics
    ports, and each worker's own document under ``workers``."""
    first = workers[0]
    return {"pid": os.getpid(), "host": config.host, "port": port, "http_port": first.get("http_port"),
            "metrics_host": first["metrics_host"],
            "metrics_ports": [p for w in workers for p in w["metrics_ports"]], "models": first["models"],
            "default_model": first["default_model"], "device": first["device"], "worker_index": -1,
            "workers": workers}


def supervise(config: ServerConfig, argv: Sequence[str]) -> int:
    reserved = _reserve_port(config.host) if config.port == 0 else None
    port = reserved.getsockname()[1] if reserved is not None else config.port
    http_reserved = _reserve_port(config.http_host or config.host) if config.http_port == 0 else None
    http_port = http_reserved.getsockname()[1] if http_reserved is not None else config.http_port
    workers: list[subprocess.Popen] = []
    stopping = []

    def stop(signum, _frame) -> None:
        if not stopping:
            log.info("stopping: passing %s to %d workers", signal.Signals(signum).name, len(workers))
        stopping.append(signum)
        if config.ready_file:
            remove_ready_file(config.ready_file)  # stopping is not SERVING; also removed at exit
        for worker in workers:
            if worker.poll() is None:
                worker.send_signal(signal.SIGTERM)

    for sig in (signal.SIGTERM, signal.SIGINT):  # before any worker exists, so none is ever orphaned
        signal.signal(sig, stop)
    log.info("starting %d workers on %s:%d", config.workers, config.host, port)
    ready_dir = Path(tempfile.mkdtemp(prefix="cifar10-workers-"))
    ready_files = [ready_dir / f"worker-{i}.json" for i in range(config.workers)]
    serving = False
    try:
        write_worker_set(ready_dir, config.workers)  # read by each worker as it starts
        for i in range(config.workers):
            if not stopping:
                # The death signal fires when the thread that forked exits: this one, the main thread.
                workers.append(subprocess.Popen(worker_argv(argv, config, i, port, ready_files[i], http_port),
                                                preexec_fn=_die_with(os.getpid())))
        while not stopping:
            failed = [w for w in workers if w.poll() is not None]
            if failed:
                log.error("worker %d exited with status %s; stopping the others",
                          workers.index(failed[0]), failed[0].returncode)
                stop(signal.SIGTERM, None)
                _wait_all(workers, config.grace_period_seconds + EXIT_SLACK_SECONDS)
                return 1
            if not serving:
                serving = _announce_when_all_serving(config, port, ready_files)
            time.sleep(0.1)
        _wait_all(workers, config.grace_period_seconds + EXIT_SLACK_SECONDS)
    finally:
        if config.ready_file:
            remove_ready_file(config.ready_file)
        shutil.rmtree(ready_dir, ignore_errors=True)
        for sock in (reserved, http_reserved):
            if sock is not None:
                sock.close()
    return 0 if all(w.returncode == 0 for w in workers) else 1


def _announce_when_all_serving(config: ServerConfig, port: int, ready_files: list[Path]) -> bool:
    """Once every worker has written its ready file: the one log line and ``--ready-file``. True once done."""
    documents = [read_ready_file(path) for path in ready_files]
    if any(d is None for d in documents):
        return False
    document = ready_document(config, port, documents)
    log.info("serving on %s:%d with %d workers (metrics on %s)", config.host, port, len(documents),
             ", ".join(map(str, document["metrics_ports"])) or "off")
    if config.ready_file:
        write_ready_file(config.ready_file, document)
    return True


def _wait_all(workers: list[subprocess.Popen], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    for worker in workers:
        try:
            worker.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.error("worker pid %d did not exit in %.0fs; killing it", worker.pid, seconds)
            worker.kill()
            worker.wait()
