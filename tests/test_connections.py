"""Connection hygiene on a real server over real sockets: connections that never finish the HTTP/2
handshake, or never use it, are closed after their timeouts, and old ones get GOAWAY while their
client's calls go on."""

from __future__ import annotations

import socket
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cifar10_serving.server.config import ServerConfig, parse_config
from tests.helpers.servers import RunningServer, make_config

HANDSHAKE_MS, IDLE_MS = 1000, 2000
PER_KIND = 20
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"  # RFC 9113 3.4
EMPTY_SETTINGS = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"  # length 0, type SETTINGS, no flags, stream 0
CLOSE_WITHIN = 20.0  # seconds: the timeouts (the idle one has jitter) with room for a loaded machine


@pytest.fixture(scope="module")
def strict_server(tiny_models_dir):
    running = RunningServer(make_config(tiny_models_dir, handshake_timeout_ms=HANDSHAKE_MS, max_connection_idle_ms=IDLE_MS,
                                        max_connection_age_ms=0))
    yield running
    running.stop(grace=1.0)


def _closed_by_peer(sock: socket.socket) -> bool:
    try:
        while True:
            if not sock.recv(65536):
                return True  # FIN: the server closed it
    except BlockingIOError:
        return False
    except OSError:
        return True  # reset


def test_connections_that_never_finish_the_handshake_or_never_call_are_closed(strict_server):
    """Raw TCP that never speaks and HTTP/2 without SETTINGS: the handshake timeout. HTTP/2 that sends
    SETTINGS but never acknowledges the server's (the handshake is done, no call ever comes): the idle
    timeout. gRPC's defaults would keep the first for 120 s and the last for ever."""
    kinds = {"silent": b"", "preface only": PREFACE, "settings never acknowledged": PREFACE + EMPTY_SETTINGS}
    sockets: dict[str, list[socket.socket]] = {kind: [] for kind in kinds}
    try:
        for kind, greeting in kinds.items():
            for _ in range(PER_KIND):
                sock = socket.create_connection(("127.0.0.1", strict_server.app.port), timeout=10)
                sock.sendall(greeting)
                sock.setblocking(False)
                sockets[kind].append(sock)
        started = time.monotonic()
        open_ = {kind: list(socks) for kind, socks in sockets.items()}
        while any(open_.values()) and time.monotonic() - started < CLOSE_WITHIN:
            for kind in open_:
                open_[kind] = [s for s in open_[kind] if not _closed_by_peer(s)]
            time.sleep(0.1)
        assert not any(open_.values()), {kind: len(socks) for kind, socks in open_.items()}
        with grpc.insecure_channel(strict_server.target) as channel:  # and the server still serves
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        for socks in sockets.values():
            for sock in socks:
                sock.close()


def test_an_idle_grpc_connection_gets_goaway_and_the_channel_reconnects_for_the_next_call(strict_server):
    states: list[grpc.ChannelConnectivity] = []
    went_idle = threading.Event()

    def record(state: grpc.ChannelConnectivity) -> None:
        states.append(state)
        if state == grpc.ChannelConnectivity.IDLE and grpc.ChannelConnectivity.READY in states:
            went_idle.set()

    with grpc.insecure_channel(strict_server.target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
        channel.subscribe(record)
        assert went_idle.wait(CLOSE_WITHIN), states  # the server's GOAWAY ("connection idle")
        reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        channel.unsubscribe(record)


def test_an_old_connection_gets_goaway_while_its_calls_go_on(tiny_models_dir):
    """``max_connection_age_ms``: the client moves to a new connection (behind an L4 balancer, maybe
    another replica) and no call fails."""
    server = RunningServer(make_config(tiny_models_dir, max_connection_age_ms=500, max_connection_age_grace_ms=2000))
    try:
        states: list[grpc.ChannelConnectivity] = []
        with grpc.insecure_channel(server.target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
            channel.subscribe(states.append)
            deadline, calls = time.monotonic() + 15, 0
            while states.count(grpc.ChannelConnectivity.READY) < 2 and time.monotonic() < deadline:
                stub.Check(health_pb2.HealthCheckRequest(), timeout=10)  # every call succeeds, no retries
                calls += 1
                time.sleep(0.05)
            channel.unsubscribe(states.append)
        assert states.count(grpc.ChannelConnectivity.READY) >= 2, (states, calls)  # a second connection was made
    finally:
        server.stop(grace=1.0)


def test_connection_limits_come_from_flags_and_environment():
    config = parse_config(["--max-connection-idle-ms", "1234"], {"CIFAR10_MAX_CONNECTION_AGE_MS": "5678",
                                                                  "CIFAR10_HANDSHAKE_TIMEOUT_MS": "0"})
    assert (config.max_connection_idle_ms, config.max_connection_age_ms, config.handshake_timeout_ms) == (1234, 5678, 0)
    defaults = ServerConfig()
    assert defaults.max_connection_idle_ms > 0 and defaults.max_connection_age_ms > defaults.max_connection_age_grace_ms > 0
    with pytest.raises(ValueError, match="max_connection_age_grace_ms must be >= 0"):
        ServerConfig(max_connection_age_grace_ms=-1)
