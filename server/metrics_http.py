"""The /metrics HTTP endpoint: prometheus_client's exposition, served with limits.

prometheus_client's own server (``start_http_server``) gives each connection a thread and a file
descriptor for as long as the peer likes. 1,016 half-sent requests took every descriptor of a process
limited to 1,024, and new gRPC connections, health checks included, failed until the sender let go
(issue 28, finding 5). Here a connection has a deadline, and the connections a cap; what answers is
still prometheus_client's WSGI app (content negotiation, gzip, ``name[]`` filters).
"""

from __future__ import annotations

import logging
import math
import socket
import threading
import time
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import make_wsgi_app

log = logging.getLogger("server.metrics_http")

# From accept to the answer's last byte. A scrape takes milliseconds (one request, one answer of tens
# of kB); 5 s is far beyond that on a loaded host and below Prometheus's default scrape_timeout (10 s).
# Idle, half-sent and slowly read connections alike are closed then.
TIMEOUT_SECONDS = 5.0
# Connections open at once; more are closed as soon as they are accepted. A Prometheus server scrapes
# a target one request at a time, so an HA pair, KServe's metrics aggregator and a person with curl
# need a handful; 16 leaves room for that, while this port can never hold more than 16 threads and
# file descriptors of the process's (often 1,024): gRPC keeps the rest.
MAX_CONNECTIONS = 16
# How often deadlines are checked (socketserver's poll interval), so a connection lives at most
# TIMEOUT_SECONDS + this; also how long shutdown() may wait for the accept loop to notice.
POLL_SECONDS = 0.25


class _LogStream:
    """wsgiref's error stream (its tracebacks, for a timed-out or reset answer) into the log, not stderr."""

    def write(self, text: str) -> None:
        if text.strip():
            log.debug("%s", text.rstrip())

    def flush(self) -> None:
        pass


class _Handler(WSGIRequestHandler):
    """One request per connection (wsgiref's), every socket operation bounded by the server's timeout."""

    def setup(self) -> None:
        self.timeout = self.server.timeout_seconds  # StreamRequestHandler.setup sets it on the socket
        super().setup()

    def get_stderr(self):
        return _LogStream()

    def log_message(self, format: str, *args) -> None:
        pass  # no line per scrape


class MetricsServer(ThreadingMixIn, WSGIServer):
    """A thread per connection, at most ``max_connections`` of them, each shut down at its deadline."""

    daemon_threads = True  # a connection never holds up the process's exit
    # Connects waiting for accept (the kernel holds them, not us): over the cap they are accepted and
    # closed at once, so a flood drains quickly; the default 5 would drop a scrape's SYN under one.
    request_queue_size = 64

    def __init__(self, host: str, port: int, registry: CollectorRegistry, *,
                 max_connections: int = MAX_CONNECTIONS, timeout_seconds: float = TIMEOUT_SECONDS) -> None:
        if max_connections < 1:
            raise ValueError(f"max_connections must be at least 1, got {max_connections}")
        if timeout_seconds <= 0:
            raise ValueError(f"timeout_seconds must be > 0, got {timeout_seconds}")
        self.max_connections = max_connections
        self.timeout_seconds = timeout_seconds
        self._deadlines: dict[socket.socket, float] = {}  # open connections; their count is capped
        self._lock = threading.Lock()
        family, _, _, _, address = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                                      flags=socket.AI_PASSIVE)[0]
        self.address_family = family  # read by TCPServer.__init__ to make the socket
        super().__init__(address[:2], _Handler)
        self.set_app(make_wsgi_app(registry))

    def process_request(self, request: socket.socket, client_address) -> None:
        with self._lock:
            full = len(self._deadlines) >= self.max_connections
            if not full:
                self._deadlines[request] = time.monotonic() + self.timeout_seconds
        if full:
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)  # its thread ends with shutdown_request

    def shutdown_request(self, request: socket.socket) -> None:
        with self._lock:  # forgotten before it closes: service_actions never touches a closed socket
            self._deadlines.pop(request, None)
        super().shutdown_request(request)

    def service_actions(self) -> None:
        """Shuts down every connection past its deadline: a handler blocked reading or writing then
        returns, its thread ends, and the socket is closed."""
        now = time.monotonic()
        with self._lock:
            for request, deadline in self._deadlines.items():
                if deadline <= now:
                    _shut(request)
                    self._deadlines[request] = math.inf  # once is enough

    def server_close(self) -> None:
        super().server_close()
        with self._lock:
            for request in self._deadlines:
                _shut(request)

    def handle_error(self, request, client_address) -> None:
        log.debug("metrics connection from %s failed", client_address, exc_info=True)


def _shut(request: socket.socket) -> None:
    try:
        request.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # the peer has gone already


def serve_metrics(registry: CollectorRegistry, host: str, port: int, *, max_connections: int = MAX_CONNECTIONS,
                  timeout_seconds: float = TIMEOUT_SECONDS) -> tuple[MetricsServer, int]:
    """Starts /metrics on ``host:port`` ("" is every interface) in a daemon thread; returns (server,
    bound port). ``server.shutdown()`` stops it, then ``server.server_close()`` closes its sockets."""
    server = MetricsServer(host, port, registry, max_connections=max_connections, timeout_seconds=timeout_seconds)
    thread = threading.Thread(target=server.serve_forever, args=(POLL_SECONDS,), name="metrics-http", daemon=True)
    thread.start()
    return server, server.server_port
