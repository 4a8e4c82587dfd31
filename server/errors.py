"""What the serving core refuses, in words of its own: ``Rejection``, a ``Code`` and a message.

The codes are gRPC's canonical status codes (``google.rpc.Code``) by name, the vocabulary the Open
Inference Protocol's HTTP form maps too; each front-end turns them into its protocol's status in one
table (``server.grpc_handlers`` for gRPC). Messages quote what the caller sent only through
``quote`` and ``listing``, which cut it short in bounded time: a refusal travels in gRPC trailers,
which the caller's library caps (8 KiB soft by default, then RESOURCE_EXHAUSTED instead of the error).
"""

from __future__ import annotations

import enum
from typing import Iterable

from cifar10_serving.server.batching import BatchError, DeadlineExpired, ModelFailure, QueueFull

QUOTE_CHARS = 80  # of one caller string in a message
LIST_ITEMS = 5  # of a caller's list in a message, after its length


class Code(enum.Enum):
    """How a request ended, by the name of gRPC's status code."""

    OK = 0
    CANCELLED = 1
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    INTERNAL = 13
    UNAVAILABLE = 14
    UNAUTHENTICATED = 16


class Rejection(Exception):
    """A request the core or a front-end refuses, with the code and message the caller gets."""

    def __init__(self, code: Code, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def invalid(message: str) -> Rejection:
    return Rejection(Code.INVALID_ARGUMENT, message)


def rejection_for(exc: BatchError, model: str) -> Rejection:
    """What the caller is told when the batcher could not serve its request on ``model``."""
    if isinstance(exc, QueueFull):
        return Rejection(Code.RESOURCE_EXHAUSTED, str(exc))
    if isinstance(exc, DeadlineExpired):
        return Rejection(Code.DEADLINE_EXCEEDED, str(exc))
    # Running out of memory is load, worth a retry later; any other failure of the model is ours.
    oom = isinstance(exc, ModelFailure) and exc.out_of_memory
    return Rejection(Code.RESOURCE_EXHAUSTED if oom else Code.INTERNAL,
                     f"model {model!r} failed on this batch: {summary(str(exc))}")


def quote(text: str, limit: int = QUOTE_CHARS) -> str:
    """A caller's string, quoted and cut short (its length is said when cut)."""
    if len(text) <= limit:
        return repr(text)
    return repr(text[: limit - 3] + "...") + f" ({len(text):,} characters)"


def listing(items, limit: int = LIST_ITEMS) -> str:
    """A caller's list for a message: whole when short, else its length and the first few items,
    read without walking the rest (``items`` may be a protobuf repeated field of millions)."""
    n = len(items)
    head = [items[i] for i in range(min(n, limit))]
    shown = ", ".join(quote(x) if isinstance(x, str) else str(x) for x in head)
    return f"[{shown}]" if n <= limit else f"[{shown}, ...] ({n:,} items)"


def names(items: Iterable[str]) -> str:
    """Names the server chose (layers, models), comma-separated: bounded by what is loaded."""
    return ", ".join(items)


def summary(text: str, limit: int = 300) -> str:
    """The last line of an error: a TorchScript error's is the exception, the lines above it code."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    line = lines[-1] if lines else "unknown error"
    return line if len(line) <= limit else line[: limit - 3] + "..."
