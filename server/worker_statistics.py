"""With ``--workers N``: the whole server's statistics (``server.statistics``), every worker's added up
at the time of the request.

A connection lands on one worker, but Triton's statistics extension describes the server, and
perf_analyzer takes the difference of two readings around its measurement window: one worker's
figures, or figures seconds old, would be short by the other workers' share. So each worker serves
its own figures on a Unix socket in the supervisor's directory, named by the supervisor before any
worker starts (``write_worker_set``), and a worker answering ModelStatistics asks every sibling at
once and adds their figures to its own, per model version and per batch size. A sibling takes its
figures on its event loop, the only thread that changes them, and answers with one JSON line.

Why a Unix socket, not a path on each worker's metrics port: it works with metrics off, it is never
on a network interface (the directory is the supervisor's, mode 0700: only its user can connect),
its address is fixed before the worker starts (a metrics port may be picked at random and is known
from the ready files only once every model serves), and it is served on the event loop, with no
thread between the statistics and the answer.

A sibling that does not answer within ``TIMEOUT_SECONDS`` (still starting, gone, stalled) fails the
call UNAVAILABLE, naming it: a sum without it would be too small, and a reader that takes
differences would see an interval too short or negative. Asked again, it answers. A version that a
sibling does not serve (poll mode converging) adds nothing from it. A lone server asks nobody.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from pathlib import Path
from typing import Any, Callable, Sequence

from cifar10_serving.server.errors import Code, Rejection
from cifar10_serving.server.ready_file import read_ready_file, write_ready_file
from cifar10_serving.server.statistics import Statistics, VersionStatistics

log = logging.getLogger(__name__)

WORKER_SET_FILE = "workers.json"  # in the supervisor's directory, beside each worker's ready file
# For a sibling to connect, take its figures and send them: one turn of its event loop, far less than
# a forward pass. 2 s is far beyond that, and still short of the deadline a statistics reader gives
# (tritonclient: none; perf_analyzer's calls wait for minutes).
TIMEOUT_SECONDS = 2.0
# One answer's bound: a version's figures take ~150 bytes per batch size it has run, so 64 MiB holds
# hundreds of versions at --max-batch-size 1024; the bound only stops a runaway.
MAX_ANSWER_BYTES = 64 * 1024 * 1024
BACKLOG = 64  # siblings' connections waiting for the loop to accept them: a few per statistics call


def write_worker_set(directory: Path, workers: int) -> None:
    """The supervisor's part, before it starts any worker: how many there are and each one's
    statistics socket, in ``directory`` (where each worker's ready file goes too)."""
    write_ready_file(directory / WORKER_SET_FILE,
                     {"workers": workers, "sockets": [str(directory / f"worker-{i}.sock") for i in range(workers)]})


class WorkerStatistics:
    """The statistics a process answers: for a lone server its own, for a worker of ``--workers``
    its own plus every sibling's. ``own()``: this process's versions (name, version, statistics)."""

    def __init__(self, own: Callable[[], Sequence[Any]], sockets: Sequence[str] = (), index: int = -1) -> None:
        self.own = own
        self.sockets = list(sockets)  # worker i's at i; empty for a lone server
        self.index = index
        self.workers = max(1, len(self.sockets))  # processes in the server
        self._listening: asyncio.Task | None = None

    @classmethod
    def of(cls, config, own: Callable[[], Sequence[Any]]) -> WorkerStatistics:
        """A worker (``config.worker_index`` >= 0 and its ready file beside the supervisor's worker set)
        starts serving its own figures at once, on the running event loop; any other process is lone."""
        found = None
        if config.worker_index >= 0 and config.ready_file:
            found = read_ready_file(Path(config.ready_file).parent / WORKER_SET_FILE)
        if found is None:
            return cls(own)
        workers = cls(own, found["sockets"], config.worker_index)
        workers.listen()
        return workers

    def listen(self) -> None:
        """Binds this worker's socket now (a sibling's connection waits in the kernel's queue until the
        loop accepts it); it is served for the life of the process, so a draining worker still reports."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(self.sockets[self.index])
            sock.listen(BACKLOG)
        except OSError:
            sock.close()
            raise
        self._listening = asyncio.get_running_loop().create_task(
            asyncio.start_unix_server(self._answer, sock=sock, backlog=BACKLOG), name="worker-statistics")

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """A sibling's request: this worker's figures, taken now, on the loop that changes them."""
        document = [{"name": v.name, "version": v.version, "statistics": v.statistics.to_json()} for v in self.own()]
        try:
            writer.write(json.dumps(document).encode() + b"\n")
            await asyncio.wait_for(writer.drain(), TIMEOUT_SECONDS)
        except (OSError, asyncio.TimeoutError):
            pass  # the sibling gave up or went away: it answers its caller UNAVAILABLE itself
        finally:
            writer.close()

    async def total(self, versions: Sequence[Any]) -> list[VersionStatistics]:
        """``versions`` (this process's, those a request asked for) with every sibling's figures for the
        same versions added: the whole server's, as of now. UNAVAILABLE when a sibling does not say."""
        if self.workers == 1:
            return [VersionStatistics(v.name, v.version, v.statistics) for v in versions]
        answers = await asyncio.gather(*(self._ask(i) for i in range(self.workers) if i != self.index))
        totals = []
        for v in versions:  # own figures last, so that they are the newest in the sum
            total = Statistics()
            for answer in answers:
                if (v.name, v.version) in answer:
                    total.include(answer[v.name, v.version])
            total.include(v.statistics)
            totals.append(VersionStatistics(v.name, v.version, total))
        return totals

    async def _ask(self, i: int) -> dict[tuple[str, str], Statistics]:
        """Worker ``i``'s figures, by (name, version)."""
        async def read() -> bytes:
            reader, writer = await asyncio.open_unix_connection(self.sockets[i], limit=MAX_ANSWER_BYTES)
            try:
                return await reader.readline()
            finally:
                writer.close()

        try:
            line = await asyncio.wait_for(read(), TIMEOUT_SECONDS)
            return {(e["name"], e["version"]): Statistics.from_json(e["statistics"]) for e in json.loads(line)}
        except asyncio.TimeoutError:
            why = f"no answer within {TIMEOUT_SECONDS:g} s"
        except (OSError, ValueError, KeyError, TypeError) as exc:  # not listening (yet, or any more); cut short
            why = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        log.warning("worker %d's statistics: %s", i, why)
        raise Rejection(Code.UNAVAILABLE, f"the statistics are the sum of every worker's, and worker {i} did not "
                                          f"send its own ({why}): ask again (a worker that is starting or "
                                          f"stopping cannot say)")
