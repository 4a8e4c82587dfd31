"""The answer budget: a server-wide bound on the memory held by answers not yet sent.

A request for feature maps can ask for an answer hundreds of times its own size, and a client that
reads nothing (it grants no HTTP/2 flow-control window) leaves each answer in the server's memory
until its connection closes. So before any work, a request reserves what it will hold: its own
bytes, its decoded images and its answer (images x the requested layers' sizes x the dtype, from
the model's layer table), and it is refused at once, RESOURCE_EXHAUSTED, when that does not fit.
The reservation is released when the answer has been written or the call has ended otherwise.

Requests with feature maps may fill the budget only up to ``FEATURE_SHARE``: the rest is kept for
answers without them, which are small, so that feature-map traffic cannot shut out plain calls.
Used on the event loop only: no locks.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from cifar10_serving.server.metrics import Metrics

MiB = 1 << 20
# What the process holds of an answer not yet sent: grpc.aio keeps the response message, its
# serialised bytes and its own copy in the transport's send buffer until the write completes.
HELD_COPIES = 3
# Per image and per feature map beside the tensors: the message's fields, the label strings, the
# probabilities; generous, so that many small answers are not under-counted.
IMAGE_OVERHEAD_BYTES = 1024
MAP_OVERHEAD_BYTES = 128
# A caller's id echoed in its answer: the request's gRPC bytes and parsed message (counted with the
# request), the answer's message, its serialisation and gRPC's copy, and the Python string between.
# Six in all, which is what an unread Classify or Explain answer was measured holding (the dated
# figures: bench/RESULTS.md, "Copies of an echoed id").
ECHO_COPIES = 4  # beside the request's two
# A refusal inside a stream: the answer message around its text, in HELD_COPIES copies.
REFUSAL_OVERHEAD_BYTES = 256
FEATURE_SHARE = 0.75  # of the budget, for requests that ask for feature maps
DEFAULT_MEMORY_SHARE = 4  # the automatic budget: a quarter of the memory the process may use
# cgroup v2, then v1: a container's limit, which is what the kernel enforces, not the host's memory
CGROUP_LIMIT_FILES = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")


def memory_bytes() -> int:
    """The memory this process may use: the host's physical memory, or its cgroup's limit if lower."""
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for path in CGROUP_LIMIT_FILES:
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit():  # "max" (v2) means no limit; v1 writes a huge number instead
            return min(physical, int(text))
    return physical


def default_budget_bytes() -> int:
    """A quarter of the memory: the rest is for the models, the allocator's caches and the requests
    gRPC has read but not yet handed over. Each process of ``--workers`` takes its own quarter."""
    return memory_bytes() // DEFAULT_MEMORY_SHARE


class OverBudget(Exception):
    """A request whose answer does not fit; the message says what to ask for instead."""


class Reservation:
    """Bytes held from a budget until ``release()``; releasing twice is harmless."""

    def __init__(self, budget: AnswerBudget | None, nbytes: int) -> None:
        self._budget = budget
        self.nbytes = nbytes

    def release(self) -> None:
        if self._budget is not None:
            self._budget._give_back(self.nbytes)
            self._budget = None


class Reservations(list):
    """Several reservations held and released as one (a request answered by two paths)."""

    @property
    def nbytes(self) -> int:
        return sum(r.nbytes for r in self)

    def release(self) -> None:
        for reservation in self:
            reservation.release()


class AnswerBudget:
    def __init__(self, limit_bytes: int, metrics: Metrics) -> None:
        self.limit = limit_bytes
        self.in_use = 0
        self._metrics = metrics
        metrics.answer_budget.set(limit_bytes)
        metrics.answer_budget_in_use.set(0)

    def reserve(self, nbytes: int, *, features: bool, model: str, advice: str) -> Reservation:
        """Holds ``nbytes`` or raises ``OverBudget``; ``advice`` says what a smaller request asks for."""
        limit = int(self.limit * FEATURE_SHARE) if features else self.limit
        if self.in_use + nbytes > limit:
            self._metrics.answer_budget_refusals.labels(model).inc()
            if nbytes > limit:
                raise OverBudget(f"this answer needs {_mb(nbytes)} of server memory, more than the "
                                 f"{_mb(limit)} it may hold for one; {advice}")
            raise OverBudget(f"the server holds {_mb(self.in_use)} of answers not yet sent or computed, of "
                             f"{_mb(limit)}; this one needs {_mb(nbytes)}. Read answers as they come, retry with "
                             f"backoff, or {advice}")
        self.in_use += nbytes
        self._metrics.answer_budget_in_use.set(self.in_use)
        return Reservation(self, nbytes)

    def _give_back(self, nbytes: int) -> None:
        self.in_use -= nbytes
        self._metrics.answer_budget_in_use.set(self.in_use)


def layer_elements(metadata: dict) -> dict[str, int]:
    """Elements per image of each layer's output, from the model's layer table."""
    return {row["name"]: math.prod(row["output_shape"]) for row in metadata["layers"]}


def answer_bytes(images: int, elements: int, layers: int, itemsize: int, classes: int) -> int:
    """What one answer costs while held: ``elements`` feature values per image (summed over its
    ``layers`` maps) of ``itemsize`` bytes, and the probabilities, in ``HELD_COPIES`` copies; and the
    forward pass's float32 maps, which live until the answer is built."""
    per_image = elements * itemsize + layers * MAP_OVERHEAD_BYTES + classes * 4 + IMAGE_OVERHEAD_BYTES
    return images * (HELD_COPIES * per_image + 4 * elements)


def explanation_bytes(images: int, pixels: int, value_bytes: int = 4) -> int:
    """An explanation's answer while held: two maps of ``pixels`` per image at ``value_bytes`` a value
    (4: float32, as protobuf and binary tensors hold them; more for JSON text), in ``HELD_COPIES``
    copies; and the gradients of the pass, about four float32 maps more."""
    per_image = 2 * pixels * value_bytes + IMAGE_OVERHEAD_BYTES
    return images * (HELD_COPIES * per_image + 4 * 2 * pixels * 4)


def refusal_bytes(message_bytes: int, echo_bytes: int) -> int:
    """A refusal answered inside a stream: its message and echoed id, in ``HELD_COPIES`` copies."""
    return HELD_COPIES * (REFUSAL_OVERHEAD_BYTES + message_bytes + echo_bytes)


def _mb(nbytes: int) -> str:
    return f"{nbytes / MiB:,.1f} MiB"
