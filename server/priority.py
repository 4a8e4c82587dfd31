"""The event loop before the compute: compute threads run at a lower CPU priority than the loop.

On a host whose cores the forward passes, decoding and answer encoding fill, the event loop thread
is runnable but waits in the kernel's run queue behind them: on the 2-core VM that queueing, not
loop work, was most of the loop's late wake-ups (bench/RESULTS.md), and health checks waited for it. A thread that
does compute raises its own nice value by ``compute_nice`` when it starts (on Linux nice is per
thread, and the threads it then starts, OpenMP's among them, inherit it), so when the loop wakes
the scheduler runs it first; the compute loses nothing it would not otherwise have lost to the loop.
"""

from __future__ import annotations

import logging
import os
import threading

log = logging.getLogger("server.priority")


def lower_priority(nice: int) -> None:
    """Raises the calling thread's nice value by ``nice`` (0: nothing). Never fails the thread."""
    if nice <= 0 or not hasattr(os, "setpriority"):
        return
    tid = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, tid, min(19, thread_nice(tid) + nice))
    except OSError as exc:  # a sandbox may refuse even lowering one's own priority
        log.warning("could not lower the priority of thread %s: %s", threading.current_thread().name, exc)


def thread_nice(native_id: int | None = None) -> int:
    """The nice value of the thread with this native id (default: the calling thread)."""
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id() if native_id is None else native_id)


def idle_priority() -> None:
    """Runs the calling thread only when no other thread wants a core (Linux's SCHED_IDLE; threads
    it starts, OpenMP's among them, inherit it): for work that must never slow serving, such as
    warming a model that already serves. Elsewhere, or where refused, the lowest nice value."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))  # 0: the calling thread, on Linux
    except (AttributeError, OSError):
        lower_priority(19)
