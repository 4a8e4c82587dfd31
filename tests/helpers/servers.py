"""A server for tests, in process or as a child process, with the settings every test shares:
the tiny models of ``tiny_models_dir`` (conftest.py), ``tiny-max`` by default, one torch thread,
one round of warm-up.

- in process: ``RunningServer(make_config(models_dir, **overrides))``, on its own event loop;
- as a child process: ``ServerProcess(server_args(models_dir, **flags))``
  (``cifar10_serving.server.launcher``), for what needs a process: signals, exit codes, workers.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import replace
from pathlib import Path

from bench.servers import server_args as bench_server_args
from cifar10_serving.server.config import ServerConfig

# The flags of a child-process test server, as keyword arguments of ``server_args``.
SERVER_FLAGS = {
    "default_model": "tiny-max",
    "torch_threads": 1,
    "warmup_batches": 1,  # the server's default too; said here because start-up time is what tests wait on
    "grace_period_seconds": 1,  # the tests that drain in-flight calls set their own
}


def server_args(models_dir: str | Path, **flags) -> list[str]:
    """``--models-dir MODELS_DIR`` and ``SERVER_FLAGS`` with ``flags`` over them, as command-line flags:
    ``max_batch_size=16`` gives ``--max-batch-size 16``; a value of None leaves the flag out, so the
    server's own default holds (``torch_threads=None`` with ``--workers``, which share out the cores)."""
    return bench_server_args(models_dir, **{**SERVER_FLAGS, **flags})  # one way to spell the flags, bench's


def make_config(models_dir: Path, **overrides) -> ServerConfig:
    """The in-process server's settings: those of ``server_args``, one model instance, a 5 s grace."""
    base = ServerConfig(host="127.0.0.1", port=0, metrics_port=0, models_dir=str(models_dir),
                        default_model="tiny-max", warmup_batches=1, torch_threads=1, instances=1,
                        grace_period_seconds=5.0, http_port=0)  # a free port: never Triton's 8000 twice
    return replace(base, **overrides)


class RunningServer:
    """A real server (``server.main.create_server``) on its own event loop in a background thread."""

    def __init__(self, config: ServerConfig, registry=None) -> None:
        from cifar10_serving.server.main import create_server

        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="test-server", daemon=True)
        self.thread.start()
        self.app = self.run(create_server(config, registry), timeout=120)
        self.run(self.app.all_ready(), timeout=120)  # tests use every model from the start
        self.target = f"127.0.0.1:{self.app.port}"

    def run(self, coro, timeout: float = 30):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self, grace: float | None = None) -> None:
        try:
            self.run(self.app.stop(grace), timeout=60)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()


def refused_start(models_dir: Path, cwd: Path, timeout: float = 120.0) -> str:
    """Starts a server on ``models_dir`` (``tiny-max`` the default model) that must refuse to start:
    asserts it exits with an error (a server that serves never exits: it is killed, and the assertion
    fails) and returns its stderr. ``timeout`` allows for importing torch and loading on 2 shared cores."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("CIFAR10_")}
    proc = subprocess.Popen([sys.executable, "-m", "cifar10_serving.server", "--models-dir", str(models_dir),
                             "--default-model", "tiny-max", "--port", "0", "--metrics-port", "-1",
                             "--warmup-batches", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd)
    try:
        _, stderr = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:  # it started serving: what it should have refused was accepted
            proc.kill()
            proc.communicate()
    assert proc.returncode not in (0, None) and proc.returncode > 0, stderr
    assert "cannot start" in stderr, stderr
    return stderr
