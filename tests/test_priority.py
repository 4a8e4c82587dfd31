"""Compute threads below the event loop (server.priority): with ``--compute-nice N`` the forward,
decoding and answer threads of a real server run N nicer than the thread that runs the loop."""

from __future__ import annotations

import threading

import grpc
import pytest

from cifar10_serving.protos.cifar10.v1 import classifier_pb2 as pb
from cifar10_serving.protos.cifar10.v1 import classifier_pb2_grpc as pb_grpc
from cifar10_serving.server.config import ServerConfig
from cifar10_serving.server.priority import lower_priority, thread_nice
from tests.helpers.images import encode, random_images
from tests.helpers.servers import RunningServer, make_config

NICE = 3


def test_forward_decode_and_answer_threads_run_nicer_than_the_loop(tiny_models_dir):
    running = RunningServer(make_config(tiny_models_dir, compute_nice=NICE, instances=2))
    try:
        with grpc.insecure_channel(running.target) as channel:
            stub = pb_grpc.ClassifierStub(channel)
            image = pb.Image(encoded=encode(random_images(1, seed=5)[0]))  # a decoding thread
            reply = stub.Classify(pb.ClassifyRequest(images=[image], feature_layers=["stage1.pool"]), timeout=30)
            assert reply.results[0].feature_maps  # an answer thread built it
        loop_nice = thread_nice(running.thread.native_id)
        threads = {t.name: t for t in threading.enumerate()}
        for prefix in ("forward-tiny-max-0", "forward-tiny-max-1", "decode-small", "encode"):
            named = [t for name, t in threads.items() if name.startswith(prefix)]
            assert named, f"no {prefix} thread among {sorted(threads)}"
            assert all(thread_nice(t.native_id) == min(19, loop_nice + NICE) for t in named), prefix
    finally:
        running.stop(grace=1.0)


def test_lower_priority_is_per_thread_and_zero_changes_nothing():
    seen = {}

    def run(nice):
        lower_priority(nice)
        seen[nice] = thread_nice()

    before = thread_nice()
    for nice in (0, 2):
        t = threading.Thread(target=run, args=(nice,))
        t.start()
        t.join()
    assert seen == {0: before, 2: min(19, before + 2)} and thread_nice() == before


@pytest.mark.parametrize("nice", [-1, 20])
def test_compute_nice_out_of_range_is_refused(nice):
    with pytest.raises(ValueError, match="compute_nice"):
        ServerConfig(compute_nice=nice)
