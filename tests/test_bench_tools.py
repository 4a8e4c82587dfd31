"""The measuring tools of bench/: the do-nothing model, the h2load floor's message files and its
pairing with the server's own counts, and the server CPU reading (``bench.overhead``)."""

from __future__ import annotations

import struct

import grpc
import numpy as np
import pytest

from bench import h2floor
from bench.inputs import make_requests
from bench.nullmodel import export_null
from bench.overhead import group_cpu_seconds
from bench.procfs import cpu_seconds
from cifar10_serving.protos.cifar10.v1 import classifier_pb2 as pb
from cifar10_serving.protos.cifar10.v1 import classifier_pb2_grpc as pb_grpc
from cifar10_serving.server.launcher import ServerProcess
from tests.helpers.servers import server_args

needs_h2load = pytest.mark.skipif(h2floor.available() is None, reason="h2load (apt-get install nghttp2-client) absent")

# What h2load 1.52 prints after a run, trimmed to the lines the parser reads.
H2LOAD_REPORT = """\
finished in 3.00s, 909.50 req/s, 54.41KB/s
requests: 1819 total, 1819 started, 1817 done, 1815 succeeded, 2 failed, 1 errored, 0 timeout
status codes: 1815 2xx, 0 3xx, 0 4xx, 0 5xx
                     min         max         mean         sd        +/- sd
time for request:      659us     43.06ms      8.51ms      7.00ms    79.66%
"""


def test_h2load_calls_spread_over_the_workers_connections():
    assert h2floor.spread_calls(1, 2) == (1, 1)  # one call: one connection, whatever the workers
    assert h2floor.spread_calls(8, 2) == (2, 4)
    assert h2floor.spread_calls(8, 1) == (1, 8)


@pytest.fixture(scope="module")
def null_server(tmp_path_factory):
    models = tmp_path_factory.mktemp("null-models")
    export_null(models)
    server = ServerProcess(server_args(models, default_model="null"))
    yield server
    server.stop(timeout=30)


def test_message_file_holds_one_length_prefixed_message(tmp_path):
    request = make_requests("raw", 64, "null")[0]
    data = h2floor.write_message_file(tmp_path / "body.bin", request.SerializeToString()).read_bytes()
    flag, length = struct.unpack(">BI", data[:5])
    assert (flag, length) == (0, len(data) - 5)
    assert pb.ClassifyRequest.FromString(data[5:]) == request


def test_h2load_report_is_parsed():
    report = h2floor.parse_report(H2LOAD_REPORT)
    assert report == {"req_per_s": 909.5, "h2_requests": 1817, "h2_failed": 3, "mean_ms": 8.51}


@pytest.mark.system
def test_null_model_answers_classify_with_ten_scores_and_its_layers(null_server):
    image = np.zeros((32, 32, 3), dtype=np.uint8)
    image[0, :10, 0] = np.arange(10)  # the ten pixels the do-nothing model reads
    request = pb.ClassifyRequest(model="null", top_k=1, feature_layers=["corner"], images=[pb.Image(raw=pb.RawTensor(
        shape=image.shape, dtype=pb.DTYPE_UINT8, layout=pb.LAYOUT_HWC, data=image.tobytes()))])
    with grpc.insecure_channel(null_server.target) as channel:
        response = pb_grpc.ClassifierStub(channel).Classify(request, timeout=30)
    (result,) = response.results
    expected = np.exp(np.arange(10)) / np.exp(np.arange(10)).sum()
    np.testing.assert_allclose(result.probabilities, expected, rtol=1e-5)
    assert result.top_k[0].index == 9
    (feature,) = result.feature_maps
    assert (feature.layer, list(feature.shape)) == ("corner", [10])


@pytest.mark.system
def test_server_cpu_counts_its_whole_process_group(null_server):
    assert group_cpu_seconds(null_server.pid) >= cpu_seconds(null_server.pid) > 0
    assert group_cpu_seconds(2**22 + 1) == 0  # no such group (above the kernel's largest pid)


@pytest.mark.system
@needs_h2load
def test_h2load_calls_are_counted_by_the_server(null_server, tmp_path):
    """A second of calls: in 0.3 s windows on a busy 2-core machine h2load sometimes finished none."""
    body = h2floor.write_message_file(tmp_path / "health.bin", b"")
    run = h2floor.run_h2load(null_server, h2floor.HEALTH_CHECK, body, streams=2, duration=1.0, warmup=0.5)
    assert run["calls"] >= run["h2_requests"] > 0
    assert run["errors"] == run["h2_failed"] == 0 and run["codes"] == {"OK": run["calls"]}


@pytest.mark.system
@needs_h2load
def test_h2load_grpc_errors_show_in_the_servers_counts(null_server, tmp_path):
    """A gRPC error is HTTP 200 to h2load: only the server's counts show it."""
    request = make_requests("raw", 1, "no-such-model")[0]
    body = h2floor.write_message_file(tmp_path / "bad.bin", request.SerializeToString())
    run = h2floor.run_h2load(null_server, h2floor.CLASSIFY, body, streams=2, duration=1.0, warmup=0.5)
    assert run["h2_failed"] == 0
    assert run["errors"] == run["calls"] > 0 and "OK" not in run["codes"]
