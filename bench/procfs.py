"""What /proc says about this machine and about a process: the one-line machine description the
reliability commands print first, a process's CPU time, and its resident memory."""

from __future__ import annotations

import os

MiB = 1 << 20


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


def cpu_seconds(pid: int | str = "self") -> float:
    """User + system CPU time process ``pid`` has used so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def memory_bytes(pid: int, field: str = "VmRSS") -> int:
    """Resident bytes now (VmRSS), or the peak since ``reset_peak`` (VmHWM)."""
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def reset_peak(pid: int) -> None:
    """Starts VmHWM over from the present resident size."""
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")
