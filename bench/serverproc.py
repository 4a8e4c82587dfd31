"""The server process for the reliability commands (fuzz, overload, soak): the shared harness
(``cifar10_serving.server.launcher``) plus what they read from /proc, and small reporting helpers."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Sequence

from cifar10_serving.server import launcher

ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20


class ServerProcess(launcher.ServerProcess):
    """A lone server on free ports (the pid read is the server's own: no ``--workers`` here)."""

    def memory(self, field: str = "VmRSS") -> int:
        """Resident bytes now (VmRSS), or the peak since ``reset_peak`` (VmHWM)."""
        with open(f"/proc/{self.pid}/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))

    def cpu_seconds(self) -> float:
        """User + system CPU time the server has used so far."""
        return cpu_seconds(self.pid)

    def reset_peak(self) -> None:
        with open(f"/proc/{self.pid}/clear_refs", "w") as f:
            f.write("5")

    def timed_stop(self, timeout: float = 60.0) -> float:
        """SIGTERM, then the seconds it took to exit."""
        start = time.monotonic()
        self.stop(timeout=timeout)
        return time.monotonic() - start


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
