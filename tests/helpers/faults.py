"""Holding a faulty model (tests/helpers/faulty_model.py) busy, for queue and deadline tests."""

from __future__ import annotations

import threading
import time

from tests.helpers.faulty_model import SLOW, marked
from tests.helpers.images import random_images


def wait_for(predicate, timeout: float = 30.0) -> None:
    until = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < until, "condition not reached in time"
        time.sleep(0.01)


def slow_units(client, seconds: float) -> int:
    """How many units of work make a SLOW image take about ``seconds`` on this machine now."""
    image = marked(random_images(1, seed=90)[0], SLOW + (4,))
    start = time.perf_counter()
    client.classify([image])
    per_unit = (time.perf_counter() - start) / 4
    return int(min(255, max(8, seconds / per_unit)))


def hold_the_model(server, client, units: int):
    """Starts a SLOW request on ``server`` (a RunningServer of the faulty model) and returns
    (thread, result list) once its forward pass has begun."""
    def passes() -> float:
        return server.registry.get_sample_value("cifar10_queue_wait_seconds_count", {"model": "faulty"}) or 0.0

    started = passes()
    result = []
    thread = threading.Thread(
        target=lambda: result.append(client.classify([marked(random_images(1, seed=91)[0], SLOW + (units,))])))
    thread.start()
    wait_for(lambda: passes() > started)
    return thread, result
