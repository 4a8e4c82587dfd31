"""Decoding off the event loop: fair between requests, and abandoned when the caller has gone.

Two lanes of threads. Every request starts in the small lane, whose one thread reads its image
headers (no pixels; each in bounded time, ``server.jpeg_markers``), one image a turn like decoding,
and refuses a request as soon as it would decode more than ``max_request_pixels``. A request whose images are all small (``SMALL_IMAGE_FACTOR`` times the
model's input or less: the usual exact-size CIFAR images) is decoded there; any other moves to the
large lane. So a small image never waits behind a large one.

Each lane serves its requests in turn, one image at a time, not whole requests in arrival order: a
request of 64 large images takes its share of the threads, not all of them for seconds. Between
images a thread checks whether the call was cancelled or its deadline passed, and stops decoding
it (``cifar10_decode_abandoned_total``). Health and small raw-tensor calls never come here.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from cifar10_serving.server.images import ImageError, Opened, Resize, open_image
from cifar10_serving.server.metrics import Metrics
from cifar10_serving.server.priority import lower_priority

log = logging.getLogger(__name__)

LARGE_LANE_THREADS = 2  # two, so that one large image cannot hold up all large-image decoding
SMALL_IMAGE_FACTOR = 4  # "small": up to 4x the model's input pixels (64x64 for a 32x32 model)


class RequestTooLarge(ImageError):
    """A request whose images would decode to more pixels than the per-request budget."""


class DecodeExpired(Exception):
    """The call's deadline passed while its images were being decoded."""


@dataclass(eq=False)
class _Job:
    images: list  # the request's images (server.images.Source)
    model: str
    out: np.ndarray  # n x C x H x W uint8
    resize: Resize
    deadline: float | None  # on time.monotonic()'s clock
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    opened: list[Opened] = field(default_factory=list)
    pixels: int = 0  # what the opened images decode to
    headers_read: bool = False
    next: int = 0  # the next image to claim
    finished: int = 0  # images decoded
    over: bool = False  # failed, abandoned or complete: claim nothing more
    abandoned: bool = False  # set by the caller's side when the call ends early
    started: float = field(default_factory=time.perf_counter)


class Decoder:
    """The two lanes, shared by all of one server's requests."""

    def __init__(self, metrics: Metrics, max_image_pixels: int, max_request_pixels: int, nice: int = 0) -> None:
        self.metrics = metrics
        self.nice = nice  # decoding threads' priority below the event loop's (server.priority)
        self.max_image_pixels = max_image_pixels
        self.max_request_pixels = max_request_pixels
        self._small = _Lane("decode-small", 1, self, self._small_step)
        self._large = _Lane("decode-large", LARGE_LANE_THREADS, self, self._large_step)

    async def decode(self, images, model: str, shape: tuple[int, int, int], resize: Resize,
                     deadline: float | None) -> np.ndarray:
        """The request's images as n x C x H x W uint8. Raises ``ImageError`` or ``DecodeExpired``;
        cancelling the caller abandons the decoding at the next image."""
        loop = asyncio.get_running_loop()
        job = _Job(list(images), model, np.empty((len(images), *shape), dtype=np.uint8), resize, deadline, loop,
                   loop.create_future())
        self._small.put(job)
        try:
            return await job.future
        finally:
            job.abandoned = True  # read by the lanes' threads; a plain flag is enough under the GIL

    # ------------------------------------------------------------------ the lanes' work (their threads)
    def _small_step(self, lane: _Lane, job: _Job) -> None:
        if job.headers_read:
            self._decode_one(lane, job)
            return
        # One header a turn: a request of many images takes its turns beside the others', and its
        # caller's deadline or cancellation is seen between them.
        size = job.out.shape[2:]
        i = len(job.opened)
        job.opened.append(open_image(job.images[i], i, size, job.resize, self.max_image_pixels))
        job.pixels += job.opened[-1].pixels
        n = len(job.images)
        if job.pixels > self.max_request_pixels:
            at_least = "" if i + 1 == n else "at least "
            raise RequestTooLarge(f"the request's {n} images decode to {at_least}{job.pixels:,} pixels; the "
                                  f"limit per request is {self.max_request_pixels:,}: send fewer or smaller images")
        if i + 1 < n:
            lane.requeue(job)
            return
        job.headers_read = True
        small = SMALL_IMAGE_FACTOR * size[0] * size[1]
        if any(o.pixels > small for o in job.opened):
            self._large.put(job)
        else:
            lane.requeue(job)

    def _large_step(self, lane: _Lane, job: _Job) -> None:
        self._decode_one(lane, job)

    def _decode_one(self, lane: _Lane, job: _Job) -> None:
        i = lane.claim(job)
        if i is None:
            return
        job.out[i] = job.opened[i].decode().transpose(2, 0, 1)
        if lane.finish_one(job):
            self.metrics.preprocess_seconds.labels(job.model).observe(time.perf_counter() - job.started)
            _settle(job, job.out)

    def _fail(self, job: _Job, exc: BaseException) -> None:
        _settle(job, exc)

    def _abandon(self, job: _Job) -> None:
        expired = job.deadline is not None and time.monotonic() >= job.deadline
        self.metrics.decode_abandoned.labels(job.model, "deadline" if expired else "cancelled").inc()


class _Lane:
    """Threads serving jobs in turn, one step each; started on first use."""

    def __init__(self, name: str, threads: int, decoder: Decoder, step) -> None:
        self.name = name
        self.threads = threads
        self._decoder = decoder
        self._step = step
        self._jobs: collections.deque[_Job] = collections.deque()
        self._cond = threading.Condition()
        self._started = False

    def put(self, job: _Job) -> None:
        with self._cond:
            if not self._started:
                self._started = True
                for k in range(self.threads):
                    threading.Thread(target=self._run, name=f"{self.name}-{k}", daemon=True).start()
            self._jobs.append(job)
            self._cond.notify()

    def requeue(self, job: _Job) -> None:
        """``job`` to the back of the line, for its next step."""
        with self._cond:
            if job not in self._jobs:
                self._jobs.append(job)
                self._cond.notify()

    def claim(self, job: _Job) -> int | None:
        """The next image of ``job`` for this thread; the job goes to the back of the line while
        images remain, so another thread (or request) comes next."""
        with self._cond:
            if job.over or job.next >= len(job.opened):
                return None
            i = job.next
            job.next += 1
            if job.next < len(job.opened) and job not in self._jobs:
                self._jobs.append(job)
                self._cond.notify()
            return i

    def finish_one(self, job: _Job) -> bool:
        """Counts a decoded image; True once the job's last image is done."""
        with self._cond:
            job.finished += 1
            if job.finished == len(job.opened) and not job.over:
                job.over = True
                return True
            return False

    def _end(self, job: _Job) -> None:
        with self._cond:
            job.over = True
            if job in self._jobs:
                self._jobs.remove(job)

    def _run(self) -> None:
        decoder = self._decoder
        lower_priority(decoder.nice)
        while True:
            with self._cond:
                while not self._jobs:
                    self._cond.wait()
                job = self._jobs.popleft()
            if job.over:
                continue
            if job.abandoned or (job.deadline is not None and time.monotonic() >= job.deadline):
                self._end(job)
                decoder._abandon(job)
                if not job.abandoned:  # the deadline passed and the caller is still waiting
                    _settle(job, DecodeExpired("the deadline passed while the images were being decoded"))
                continue
            try:
                self._step(self, job)
            except ImageError as exc:
                self._end(job)
                decoder._fail(job, exc)
            except Exception as exc:  # a decoder bug: the call fails INTERNAL, the thread lives on
                log.exception("decoding failed")
                self._end(job)
                decoder._fail(job, exc)


def _settle(job: _Job, outcome) -> None:
    def set_outcome() -> None:
        if job.future.done():  # the caller gave up meanwhile
            return
        if isinstance(outcome, BaseException):
            job.future.set_exception(outcome)
        else:
            job.future.set_result(outcome)

    try:
        job.loop.call_soon_threadsafe(set_outcome)
    except RuntimeError:  # the loop is closed: the server is gone
        pass
