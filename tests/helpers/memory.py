"""What a server process holds, read from outside: its resident memory (/proc) and its answer budget
in use (/metrics)."""

from __future__ import annotations

import time


def rss(pid: int) -> int:
    """The process's resident memory, in bytes."""
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def budget_in_use(server) -> float:
    """``cifar10_answer_budget_in_use_bytes`` of a ``ServerProcess``."""
    return server.metric_sum("cifar10_answer_budget_in_use_bytes")


def wait_for_budget_back(server, seconds: float = 10.0) -> None:
    """Waits until the server holds no reservation; fails if it still does after ``seconds``."""
    until = time.monotonic() + seconds
    while budget_in_use(server) > 0 and time.monotonic() < until:
        time.sleep(0.1)
    assert budget_in_use(server) == 0
