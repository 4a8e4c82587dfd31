"""The /metrics port's limits (server.metrics_http; issue 28, finding 5): a connection is closed at its
deadline however little it sent, connections over the cap are closed at once, the port binds loopback
unless told otherwise, and many half-sent requests to a real server process whose open-file limit is
low leave its gRPC port and its scrapes working. With prometheus_client's own server each such
connection held a thread and a file descriptor until its sender let go: the descriptors ran out and
new gRPC connections, health checks included, failed."""

from __future__ import annotations

import gzip
import resource
import select
import socket
import sys
import time
import urllib.request
from contextlib import ExitStack, contextmanager

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.exposition import choose_encoder

from cifar10_serving.protos.cifar10.v1 import classifier_pb2 as pb
from cifar10_serving.protos.cifar10.v1 import classifier_pb2_grpc as pb_grpc
from cifar10_serving.server.config import ServerConfig, parse_config
from cifar10_serving.server.launcher import ServerProcess
from cifar10_serving.server.metrics_http import POLL_SECONDS, TIMEOUT_SECONDS, serve_metrics
from tests.helpers.servers import server_args
from tests.helpers.traffic import image

HALF_SENT = b"GET /metrics HTTP/1.1\r\nHost: x\r\n"  # headers never finished
# The server process's open files (it uses ~15 at rest): low, so that exhausting them is quick. Quick matters:
# prometheus_client's server accepted some 6 connections a second here, 19 s to take 114.
FD_LIMIT = 128
ABUSERS = 2 * FD_LIMIT  # half-sent connections: twice what the server could hold if each kept a descriptor
# A connect the server's backlog has no room for waits for its SYN to be sent again, 1 s and 3 s later;
# 5 s covers both. (Backlogs are short, so the abuser connects one at a time, as fast as the server accepts.)
CONNECT_SECONDS = 5.0
CALL_SECONDS = 5.0  # deadline of each gRPC call made while the abuser holds its connections


# ----------------------------------------------------------------------------- the endpoint, in process
@pytest.fixture()
def registry():
    registry = CollectorRegistry()
    Counter("probe", "A series to find in the answer.", registry=registry).inc(3)
    return registry


@contextmanager
def endpoint(registry, **limits):
    """serve_metrics on loopback with ``limits`` (short ones, so that the tests are quick)."""
    server, port = serve_metrics(registry, "127.0.0.1", 0, **limits)
    try:
        yield server, port
    finally:
        server.shutdown()
        server.server_close()


def scrape(port: int, headers: dict[str, str] | None = None):
    request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", headers=headers or {})
    with urllib.request.urlopen(request, timeout=5) as answer:
        return answer.headers, answer.read()


def seconds_until_closed(sock: socket.socket, limit: float) -> float:
    """How long until the server closes ``sock`` (EOF or reset); fails after ``limit`` seconds."""
    start = time.monotonic()
    sock.settimeout(limit)
    try:
        while sock.recv(1024):
            pass
    except ConnectionResetError:
        pass
    except TimeoutError:
        pytest.fail(f"the server kept the connection open for {limit:.1f}s")
    return time.monotonic() - start


def test_the_answer_is_prometheus_clients_exposition(registry):
    openmetrics = "application/openmetrics-text; version=1.0.0"
    with endpoint(registry) as (_, port):
        answers = [scrape(port), scrape(port, {"Accept": openmetrics}), scrape(port, {"Accept-Encoding": "gzip"})]
    (headers, body), (om_headers, om_body), (gz_headers, gz_body) = answers
    encoder, content_type = choose_encoder(None)  # what prometheus_client answers a scraper that asks for nothing
    assert headers["Content-Type"] == content_type and body == encoder(registry)
    assert om_headers["Content-Type"] == choose_encoder(openmetrics)[1] and om_body.endswith(b"# EOF\n")
    assert gz_headers["Content-Encoding"] == "gzip" and b"probe_total 3.0" in gzip.decompress(gz_body)


@pytest.mark.parametrize("sends", [[], [HALF_SENT], [b"G", b"E", b"T", b" "] * 10], ids=["idle", "half-sent", "trickle"])
def test_a_connection_is_closed_at_its_deadline_whatever_it_sends(registry, sends):
    """Idle, half-sent, or a byte every 0.2 s (which no per-read timeout would end): closed at 1 s."""
    with endpoint(registry, timeout_seconds=1.0) as (server, port):
        with socket.create_connection(("127.0.0.1", port)) as sock:
            start = time.monotonic()
            for chunk in sends:
                sock.sendall(chunk)
                if select.select([sock], [], [], 0.2)[0]:
                    break  # closed (readable at EOF): the deadline came while trickling
            closed_after = time.monotonic() - start + seconds_until_closed(sock, limit=5.0)
        assert server.timeout_seconds <= closed_after + 0.05 < server.timeout_seconds + POLL_SECONDS + 1.0
        assert b"probe_total" in scrape(port)[1]  # and the port still answers


def test_connections_over_the_cap_are_closed_at_once(registry):
    with endpoint(registry, max_connections=4, timeout_seconds=30.0) as (server, port), ExitStack() as held:
        for _ in range(server.max_connections):
            held.enter_context(socket.create_connection(("127.0.0.1", port))).sendall(HALF_SENT)
        with socket.create_connection(("127.0.0.1", port)) as extra:
            assert seconds_until_closed(extra, limit=2.0) < 2.0  # at once, not at the 30 s deadline
        with pytest.raises(OSError):  # a scrape is one more connection: turned away too while the cap is full
            scrape(port)
        held.close()  # they leave: each handler sees EOF and frees its slot
        deadline = time.monotonic() + 5
        while True:
            try:
                assert b"probe_total" in scrape(port)[1]
                break
            except OSError:
                assert time.monotonic() < deadline, "no slot came free"
                time.sleep(0.05)


def test_stopping_closes_the_connections_it_holds(registry):
    with endpoint(registry, timeout_seconds=30.0) as (server, port):
        sock = socket.create_connection(("127.0.0.1", port))
        sock.sendall(HALF_SENT)
        time.sleep(0.2)  # accepted, its handler reading
        server.shutdown()
        server.server_close()
        assert seconds_until_closed(sock, limit=2.0) < 2.0
        sock.close()


def test_bad_limits_are_refused(registry):
    with pytest.raises(ValueError, match="max_connections"):
        serve_metrics(registry, "127.0.0.1", 0, max_connections=0)
    with pytest.raises(ValueError, match="timeout_seconds"):
        serve_metrics(registry, "127.0.0.1", 0, timeout_seconds=0)


def test_metrics_bind_loopback_unless_told_otherwise():
    """Not the gRPC host: a server on 0.0.0.0 keeps /metrics on loopback until --metrics-host says."""
    assert ServerConfig().metrics_host == "127.0.0.1"
    assert parse_config(["--host", "0.0.0.0"], environ={}).metrics_host == "127.0.0.1"
    assert parse_config(["--host", "0.0.0.0", "--metrics-host", "0.0.0.0"], environ={}).metrics_host == "0.0.0.0"


# ----------------------------------------------------------------------------- a real server process
def _open_half_sent(port: int, count: int, seconds: float) -> list[socket.socket]:
    """Up to ``count`` connections to ``port``, one after another, each sending HALF_SENT; stops early
    when one is not taken within CONNECT_SECONDS (the server accepts no more) or after ``seconds``."""
    socks: list[socket.socket] = []
    deadline = time.monotonic() + seconds
    while len(socks) < count and time.monotonic() < deadline:
        sock = socket.socket()
        sock.settimeout(CONNECT_SECONDS)
        try:
            sock.connect(("127.0.0.1", port))
        except OSError:
            sock.close()
            break
        socks.append(sock)
        try:
            sock.sendall(HALF_SENT)
        except OSError:
            pass  # turned away at once, as connections over the cap are
        sock.setblocking(False)
    return socks


def _closed_by_server(sock: socket.socket) -> bool:
    try:
        return sock.recv(1024) == b""
    except ConnectionResetError:
        return True
    except (BlockingIOError, OSError):
        return False


@pytest.mark.system  # a real server process
def test_half_sent_scrapes_leave_grpc_and_metrics_working_under_a_low_file_limit(tiny_models_dir):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < ABUSERS + 256:
        pytest.skip(f"this process may open {soft} files; the abuser needs {ABUSERS + 256}")
    code = (f"import resource, runpy; resource.setrlimit(resource.RLIMIT_NOFILE, ({FD_LIMIT}, {FD_LIMIT})); "
            "runpy.run_module('cifar10_serving.server', run_name='__main__', alter_sys=True)")
    server = ServerProcess(server_args(tiny_models_dir), command=[sys.executable, "-c", code], start_timeout=120)
    abusers: list[socket.socket] = []
    try:
        assert server.ready["metrics_host"] == "127.0.0.1"  # the default: loopback
        (metrics_port,) = server.metrics_ports
        abusers = _open_half_sent(metrics_port, ABUSERS, seconds=60.0)
        with grpc.insecure_channel(server.target) as channel:  # a new connection, made while they are held
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=CALL_SECONDS)
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            answer = pb_grpc.ClassifierStub(channel).Classify(pb.ClassifyRequest(images=[image()]), timeout=CALL_SECONDS)
            assert len(answer.results) == 1
        assert len(abusers) == ABUSERS, "the metrics port stopped taking connections"
        # Past the deadline every abuser's connection is closed by the server (none held), though the
        # abuser keeps its end open; a scrape gets a slot again.
        time.sleep(TIMEOUT_SECONDS + POLL_SECONDS + 0.5)
        assert sum(map(_closed_by_server, abusers)) == len(abusers)
        assert server.metric_sum("cifar10_requests_total", method="Classify", code="OK") == 1
    finally:
        for sock in abusers:
            sock.close()
        status = server.stop()
    assert status == 0, server.log
