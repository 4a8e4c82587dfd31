"""The real server as a child process, for tests and benchmarks (``ServerProcess``).

``ServerProcess(args)`` starts ``python -m cifar10_serving.server --port 0 --metrics-port 0 --http-port 0 ARGS
--ready-file TMP`` and returns once the server has written its ready file (``--ready-file``: a JSON
document written atomically once it is SERVING), so ports are read from that file, never from log
lines. Imports neither torch nor grpc: it is cheap to import from a benchmark's client side.
"""

from __future__ import annotations

import collections
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from cifar10_serving.server.ready_file import read_ready_file

MAX_LOG_LINES = 10_000  # the server logs per start, stop and error, not per request: this is never reached in normal runs
LOG_TAIL_LINES = 40  # shown when a start fails


def connect_host(host: str) -> str:
    """The address to dial for a server bound to ``host``, bracketed when IPv6."""
    host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    return f"[{host}]" if ":" in host else host


# ----------------------------------------------------------------------------- the child process
class ServerStartError(RuntimeError):
    """The server exited, or did not write its ready file in time; the message ends with its log."""


class ServerProcess:
    """A server child process, started on free ports; ready (SERVING) when the constructor returns.

    ``command`` is what to run instead of ``python -m cifar10_serving.server`` (a benchmark's own
    entry point that takes the same flags). The child runs in its own process group, so ``kill()``
    also reaches the workers of ``--workers``; its stdout and stderr are read on a thread into
    ``log`` so the pipe never fills. ``on_line`` is called with each log line as it arrives.
    """

    def __init__(self, args: Sequence[str] = (), *, command: Sequence[str] | None = None,
                 env: dict[str, str] | None = None, cwd: str | os.PathLike | None = None,
                 start_timeout: float = 180.0, wait: bool = True,
                 on_line: Callable[[str], None] | None = None) -> None:
        self._dir = tempfile.mkdtemp(prefix="cifar10-server-")
        self.ready_path = Path(self._dir) / "ready.json"
        self.ready: dict[str, Any] = {}
        self._lines: collections.deque[str] = collections.deque(maxlen=MAX_LOG_LINES)
        self._on_line = on_line
        command = list(command) if command is not None else [sys.executable, "-m", "cifar10_serving.server"]
        # Free ports unless args say otherwise (argparse keeps the last value); our ready file always.
        argv = [*command, "--port", "0", "--metrics-port", "0", "--http-port", "0", *args,
                "--ready-file", str(self.ready_path)]
        self.proc = subprocess.Popen(argv, cwd=cwd, env={**os.environ, **(env or {})}, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
                                     start_new_session=True)
        self._reader = threading.Thread(target=self._read, name=f"server-log-{self.proc.pid}", daemon=True)
        self._reader.start()
        if wait:
            self.wait_ready(start_timeout)

    def _read(self) -> None:
        for line in self.proc.stdout:
            self._lines.append(line)
            if self._on_line is not None:
                self._on_line(line)

    def wait_ready(self, timeout: float = 180.0, all_models: bool = True) -> dict[str, Any]:
        """Waits for the ready file (``all_models``: until it says every model serves, not only the
        default one); on exit or timeout kills the process and raises ServerStartError."""
        deadline = time.monotonic() + timeout
        while (document := read_ready_file(self.ready_path)) is None or (
                all_models and not document.get("all_ready", True)):
            if self.proc.poll() is not None:
                self._fail(f"the server exited with status {self.proc.returncode} before it was ready")
            if time.monotonic() > deadline:
                self.kill()
                self._fail(f"the server was not ready within {timeout:.0f}s")
            time.sleep(0.05)
        self.ready = document
        return document

    def _fail(self, why: str) -> None:
        self.kill()
        tail = "".join(list(self._lines)[-LOG_TAIL_LINES:])
        raise ServerStartError(f"{why}; its log ends:\n{tail}")

    # ------------------------------------------------------------------ what it reported
    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def port(self) -> int:
        return int(self.ready["port"])

    @property
    def target(self) -> str:
        """``host:port`` to dial the gRPC port."""
        return f"{connect_host(self.ready['host'])}:{self.port}"

    @property
    def http_port(self) -> int | None:
        """The HTTP port of the Open Inference Protocol's REST form; None with ``--http-port -1``."""
        port = self.ready.get("http_port")
        return None if port is None else int(port)

    @property
    def http_url(self) -> str:
        """``http://host:port`` of the HTTP port (``https`` is the caller's to choose with TLS)."""
        return f"http://{connect_host(self.ready['host'])}:{self.http_port}"

    @property
    def metrics_ports(self) -> list[int]:
        """One per worker (one for a lone server); empty with ``--metrics-port -1``."""
        return [int(p) for p in self.ready["metrics_ports"]]

    def metrics_url(self, i: int = 0) -> str:
        """The /metrics URL of worker ``i``."""
        return f"http://{connect_host(self.ready['metrics_host'])}:{self.metrics_ports[i]}/metrics"

    @property
    def log(self) -> str:
        """Everything the process has written to stdout and stderr so far."""
        return "".join(list(self._lines))

    # ------------------------------------------------------------------ its metrics (prometheus_client, imported lazily)
    def metrics(self, i: int = 0) -> dict[tuple[str, tuple], float]:
        """Every sample of worker ``i``'s /metrics, keyed by (name, sorted labels)."""
        import urllib.request

        from prometheus_client.parser import text_string_to_metric_families

        body = urllib.request.urlopen(self.metrics_url(i), timeout=10).read().decode()
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(body) for s in family.samples}

    def metric_sum(self, name: str, /, **labels: str) -> float:
        """The sum of sample ``name`` over every worker and every series whose labels include ``labels``."""
        wanted = set(labels.items())
        return sum(v for i in range(len(self.metrics_ports))
                   for (n, ls), v in self.metrics(i).items() if n == name and wanted <= set(ls))

    # ------------------------------------------------------------------ its life
    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return self.proc.poll()

    def send_signal(self, sig: int) -> None:
        if self.alive:
            self.proc.send_signal(sig)

    def wait(self, timeout: float | None = None) -> int:
        """The exit status; raises subprocess.TimeoutExpired after ``timeout`` seconds."""
        return self.proc.wait(timeout)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        """Sends ``sig`` (SIGTERM drains) and waits; kills it after ``timeout`` seconds. The exit status."""
        self.send_signal(sig)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
        self._close()
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL to the process and its group (the workers of ``--workers`` too)."""
        self._kill_group()
        self.proc.wait(30)
        self._close()

    def _kill_group(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass  # the whole group is gone already

    def _close(self) -> None:
        self._kill_group()  # nothing it started outlives it, even when it exits leaving children behind
        self._reader.join(10)
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()
