"""Decoding under hostile load, against a real server process: decode bombs whose callers gave up
stop being decoded, an ordinary JPEG call meanwhile is answered well inside its deadline, and a
request over the per-request pixel budget is refused from its headers."""

from __future__ import annotations

import os
import struct
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from cifar10_serving.protos.cifar10.v1 import classifier_pb2 as pb
from cifar10_serving.protos.cifar10.v1 import classifier_pb2_grpc as pb_grpc
from cifar10_serving.server.launcher import ServerProcess
from bench.hostile import PNG_SIGNATURE, png_chunk
from tests.helpers.images import encode, random_images
from tests.helpers.servers import server_args

pytestmark = pytest.mark.system  # a server process, its CPU time read from /proc

SIDE = 4096  # at the default --max-image-pixels; zeros compress to ~50 KB and take ~0.5 s or more to decode
BOMBS_PER_REQUEST = 4
JPEG = pb.ClassifyRequest(images=[pb.Image(encoded=encode(random_images(1, seed=8)[0], "JPEG"))])


def _zeros_png(side: int) -> bytes:
    """A real side x side RGB PNG of zeros (every row filter byte and pixel 0)."""
    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    pixels = zlib.compress(bytes((3 * side + 1) * side), 9)
    return PNG_SIGNATURE + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", pixels) + png_chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def server(tiny_models_dir):
    # A pixel budget large enough for these bombs, so that they are decoded (and then abandoned).
    with ServerProcess(server_args(tiny_models_dir, max_request_pixels=BOMBS_PER_REQUEST * SIDE * SIDE)) as process:
        yield process


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def _busy_cores(pid: int, seconds: float) -> float:
    start = _cpu_seconds(pid)
    time.sleep(seconds)
    return (_cpu_seconds(pid) - start) / seconds


def test_abandoned_bombs_stop_decoding_and_an_ordinary_jpeg_is_served_meanwhile(server):
    bomb = pb.Image(encoded=_zeros_png(SIDE))
    bombs = pb.ClassifyRequest(images=[bomb] * BOMBS_PER_REQUEST)
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.ClassifierStub(channel)
        stub.Classify(JPEG, timeout=30)  # connected and warm
        idle = _busy_cores(server.pid, 0.5)
        with ThreadPoolExecutor(8) as pool:
            # 8 callers x 4 bombs: ~16 s of decoding on two threads, all abandoned after 0.3 s
            sent = [pool.submit(stub.Classify, bombs, timeout=0.3) for _ in range(8)]
            time.sleep(0.35)
            start = time.monotonic()
            assert len(stub.Classify(JPEG, timeout=5).results) == 1
            jpeg_seconds = time.monotonic() - start
            codes = [_code(f) for f in sent]
        assert codes == [grpc.StatusCode.DEADLINE_EXCEEDED] * 8
        assert jpeg_seconds < 2.0, f"the JPEG call waited {jpeg_seconds:.1f} s behind the bombs"
        # An image being decoded when its caller left is finished; nothing after it is started.
        time.sleep(2.0)
        busy = _busy_cores(server.pid, 1.0)
        assert busy < idle + 0.3, f"the server still uses {busy:.2f} cores after every bomb's caller left"
        abandoned = server.metric_sum("cifar10_decode_abandoned_total")
        assert abandoned >= 7  # a request whose images were all decoded in time is not abandoned
        assert len(stub.Classify(JPEG, timeout=5).results) == 1


def test_a_request_over_the_pixel_budget_is_refused_from_its_headers(server):
    bomb = pb.Image(encoded=_zeros_png(SIDE))
    with grpc.insecure_channel(server.target) as channel:
        start = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:
            pb_grpc.ClassifierStub(channel).Classify(pb.ClassifyRequest(images=[bomb] * 64), timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "the limit per request is" in info.value.details() and "fewer or smaller" in info.value.details()
        assert time.monotonic() - start < 2.0  # headers only: 64 decodes would take tens of seconds


def _code(future) -> grpc.StatusCode:
    try:
        future.result()
        return grpc.StatusCode.OK
    except grpc.RpcError as exc:
        return exc.code()
