"""A raw HTTP/2 gRPC client that never reads its answers: it grants no flow-control window, but
acknowledges SETTINGS and PINGs as a live peer does, so keepalive does not notice. gRPC's own
client cannot be made to do this. Uses the ``h2`` package (a test dependency)."""

from __future__ import annotations

import select
import socket
import struct
import time

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import ResponseReceived, StreamReset, TrailersReceived
from h2.settings import SettingCodes


def grpc_frame(message: bytes) -> bytes:
    """One gRPC length-prefixed message: not compressed, 4-byte big-endian length."""
    return struct.pack(">BI", 0, len(message)) + message


class WithholdingClient:
    """One connection; ``call`` opens a stream, ``send`` writes a message on it; answers are left
    unread. ``statuses`` holds each stream's grpc-status and grpc-message once it has them (a
    refusal comes as trailers alone, which flow control does not hold back)."""

    def __init__(self, host: str, port: int, timeout: float = 10.0) -> None:
        self.authority = f"{host}:{port}"
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.conn = H2Connection(H2Configuration(client_side=True, header_encoding="utf-8"))
        self.conn.initiate_connection()
        self.conn.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: 0})  # answers' DATA frames never come
        self.statuses: dict[int, tuple[int, str]] = {}
        self.reset: set[int] = set()
        self._flush()

    def call(self, path: str, message: bytes | None = None, end: bool = True) -> int:
        """Opens a stream for ``path`` (``/pkg.Service/Method``), sends ``message``; its stream id."""
        stream_id = self.conn.get_next_available_stream_id()
        self.conn.send_headers(stream_id, [(":method", "POST"), (":scheme", "http"), (":path", path),
                                           (":authority", self.authority), ("content-type", "application/grpc"),
                                           ("te", "trailers")])
        if message is not None:
            self.send(stream_id, message, end=end)
        self._flush()
        return stream_id

    def send(self, stream_id: int, message: bytes, end: bool = False) -> None:
        data = grpc_frame(message)
        # Our sending is bounded by the server's window, which gRPC opens wide; wait for room.
        while data:
            room = min(self.conn.local_flow_control_window(stream_id), self.conn.max_outbound_frame_size)
            if room <= 0:
                self.pump(0.05)
                continue
            chunk, data = data[:room], data[room:]
            self.conn.send_data(stream_id, chunk, end_stream=end and not data)
            self._flush()

    def pump(self, seconds: float) -> None:
        """Reads and answers what the server sends for ``seconds`` (SETTINGS and PING acks: h2's own)."""
        until = time.monotonic() + seconds
        while (left := until - time.monotonic()) > 0:
            readable, _, _ = select.select([self.sock], [], [], left)
            if not readable:
                return
            data = self.sock.recv(1 << 16)
            if not data:
                return
            for event in self.conn.receive_data(data):
                if isinstance(event, (TrailersReceived, ResponseReceived)):
                    headers = dict(event.headers)
                    if "grpc-status" in headers:
                        self.statuses[event.stream_id] = (int(headers["grpc-status"]), headers.get("grpc-message", ""))
                elif isinstance(event, StreamReset):
                    self.reset.add(event.stream_id)
            self._flush()

    def _flush(self) -> None:
        out = self.conn.data_to_send()
        if out:
            self.sock.sendall(out)

    def close(self) -> None:
        self.sock.close()
