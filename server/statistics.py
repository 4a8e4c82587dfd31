"""Per model version: what it answered and where the time went, as Triton's statistics extension
reports it (``ModelStatistics``; perf_analyzer reads it for the server's side of each request).

Counts and cumulative nanoseconds: requests that succeeded and failed (from the start of their
work to their answer or failure), their wait in the batcher's queue, and the three parts of the
forward pass they were in (the batch copied into the model's input, the pass, the outputs copied
back); per executed batch size, the same three parts per pass. Recorded on the event loop's thread
only (the batcher reports a pass's times when it delivers it): no locks. These are the process's
own; with ``--workers`` a worker answers the sum of every worker's (``server.worker_statistics``),
which travel between them as ``to_json`` documents.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

PARTS = ("compute_input", "compute_infer", "compute_output")  # a forward pass's three parts
DURATIONS = ("success", "fail", "queue", *PARTS)  # a request's


@dataclass
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int) -> None:
        self.count += 1
        self.ns += ns

    def include(self, other: Duration) -> None:
        self.count += other.count
        self.ns += other.ns


@dataclass
class PassTimes:
    """One forward pass's parts, in nanoseconds."""

    input_ns: int
    infer_ns: int
    output_ns: int


@dataclass
class BatchStatistics:
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)

    def include(self, other: BatchStatistics) -> None:
        for part in PARTS:
            getattr(self, part).include(getattr(other, part))


@dataclass
class Statistics:
    inference_count: int = 0  # images answered
    execution_count: int = 0  # forward passes
    last_inference_ms: int = 0
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)
    batches: dict[int, BatchStatistics] = field(default_factory=dict)

    def record_pass(self, images: int, times: PassTimes, queue_ns: list[int]) -> None:
        """A forward pass of ``images`` that served one request per entry of ``queue_ns``."""
        self.execution_count += 1
        batch = self.batches.setdefault(images, BatchStatistics())
        batch.compute_input.add(times.input_ns)
        batch.compute_infer.add(times.infer_ns)
        batch.compute_output.add(times.output_ns)
        for ns in queue_ns:  # each request was in the whole pass
            self.queue.add(ns)
            self.compute_input.add(times.input_ns)
            self.compute_infer.add(times.infer_ns)
            self.compute_output.add(times.output_ns)

    def record_success(self, images: int, ns: int) -> None:
        self.inference_count += images
        self.success.add(ns)
        self.last_inference_ms = time.time_ns() // 1_000_000

    def record_failure(self, ns: int) -> None:
        self.fail.add(ns)

    def include(self, other: Statistics) -> None:
        """Adds another worker's figures to these: counts and times add up, the last inference is the later."""
        self.inference_count += other.inference_count
        self.execution_count += other.execution_count
        self.last_inference_ms = max(self.last_inference_ms, other.last_inference_ms)
        for name in DURATIONS:
            getattr(self, name).include(getattr(other, name))
        for size, batch in other.batches.items():
            self.batches.setdefault(size, BatchStatistics()).include(batch)

    def to_json(self) -> dict[str, Any]:
        """The figures as a JSON document (``from_json`` reads it back)."""
        return asdict(self)  # json.dumps writes the batch sizes as strings; from_json makes them numbers

    @classmethod
    def from_json(cls, document: dict[str, Any]) -> Statistics:
        """What ``to_json`` wrote; KeyError, TypeError or ValueError for anything else."""
        def duration(d: dict[str, Any]) -> Duration:
            return Duration(int(d["count"]), int(d["ns"]))

        return cls(**{name: int(document[name]) for name in ("inference_count", "execution_count",
                                                              "last_inference_ms")},
                   **{name: duration(document[name]) for name in DURATIONS},
                   batches={int(size): BatchStatistics(**{part: duration(b[part]) for part in PARTS})
                            for size, b in document["batches"].items()})


@dataclass
class VersionStatistics:
    """One model version's statistics, under its name and version: what ModelStatistics lists."""

    name: str
    version: str
    statistics: Statistics
