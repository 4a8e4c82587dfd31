"""A ``python -m server`` process for the reliability commands (fuzz, overload, soak): start it on
free ports, wait for SERVING, read its memory and metrics, stop it with SIGTERM."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Sequence

ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20


class ServerProcess:
    def __init__(self, args: Sequence[str] = (), start_timeout: float = 180.0, env: dict[str, str] | None = None) -> None:
        self.log: list[str] = []
        self._ready = threading.Event()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cifar10_serving.server", "--port", "0", "--metrics-port", "0", *args],
            cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})
        threading.Thread(target=self._read, daemon=True).start()
        if not self._ready.wait(start_timeout):
            self.kill()
            raise RuntimeError("the server did not start:\n" + "".join(self.log[-20:]))
        match = re.search(r"serving .* on \S+:(\d+) \(metrics on (\d+)", "".join(self.log))
        self.target, self.metrics_port = f"127.0.0.1:{match.group(1)}", int(match.group(2))

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.log.append(line)
            if " serving " in line:
                self._ready.set()

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def memory(self, field: str = "VmRSS") -> int:
        """Resident bytes now (VmRSS), or the peak since ``reset_peak`` (VmHWM)."""
        with open(f"/proc/{self.proc.pid}/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))

    def cpu_seconds(self) -> float:
        """User + system CPU time the server has used so far."""
        return cpu_seconds(self.proc.pid)

    def reset_peak(self) -> None:
        with open(f"/proc/{self.proc.pid}/clear_refs", "w") as f:
            f.write("5")

    def metrics(self) -> dict[tuple[str, tuple], float]:
        """Every sample of its /metrics, keyed by (name, sorted labels)."""
        from prometheus_client.parser import text_string_to_metric_families

        body = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10).read().decode()
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(body) for s in family.samples}

    def metric_sum(self, name: str, **labels) -> float:
        """The sum of ``name`` over the series whose labels include ``labels``."""
        wanted = set(labels.items())
        return sum(v for (n, ls), v in self.metrics().items() if n == name and wanted <= set(ls))

    def stop(self, timeout: float = 60.0) -> float:
        """SIGTERM, then the seconds it took to exit."""
        start = time.monotonic()
        if self.alive:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return time.monotonic() - start

    def kill(self) -> None:
        if self.alive:
            self.proc.kill()
            self.proc.wait(10)


def machine() -> str:
    """One line: CPU model, cores, memory, and the load average (this machine may be shared)."""
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    with open("/proc/meminfo") as f:
        mem = int(f.readline().split()[1]) * 1024
    load = os.getloadavg()
    return (f"{model}, {os.cpu_count()} cores, {mem / (1 << 30):.0f} GiB, "
            f"load average {load[0]:.1f} at start")


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


def cpu_seconds(pid: int | str = "self") -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
