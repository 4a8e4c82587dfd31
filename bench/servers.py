"""The server under measurement, as a child process (``cifar10_serving.server.launcher.ServerProcess``):
its flags from keyword arguments, its warnings passed on, and how long it takes to stop."""

from __future__ import annotations

import sys
import time

from cifar10_serving.server.launcher import ServerProcess


def server_args(models_dir: str | None = None, **flags) -> list[str]:
    """Command-line flags from keyword arguments: ``max_queue_images=256`` gives ``--max-queue-images 256``,
    a value of None leaves the flag out (the server's default holds). Without ``models_dir`` the server
    serves the models bundled in the package (model/artifacts)."""
    args = ["--models-dir", str(models_dir)] if models_dir else []
    for name, value in flags.items():
        if value is not None:
            args += [f"--{name.replace('_', '-')}", str(value)]
    return args


def echo_problems(line: str) -> None:
    """For ``ServerProcess(on_line=...)``: the server's warnings and errors go on to our stderr; the rest
    stays in its log."""
    if " WARNING " in line or " ERROR " in line:
        sys.stderr.write(line)


def timed_stop(server: ServerProcess, timeout: float = 60.0) -> float:
    """SIGTERM, then the seconds it took to exit."""
    start = time.monotonic()
    server.stop(timeout=timeout)
    return time.monotonic() - start
