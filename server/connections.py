"""Closing the gRPC port's sockets from outside gRPC, the last step of a drain (server/main.py ``App.stop``).

Why: when ``grpc.aio`` stops a server, a call that has reached gRPC but no handler yet is failed with
CANCELLED (grpc/grpc#41785, open), which tells a client it cancelled a call it did not; and the
GOAWAY that would stop clients sending comes from that same stop, too late. grpc.aio offers no way
to close the listener or send GOAWAY while it keeps running. So, once the drain has answered every
call in flight, the server shuts down the listening socket (new connections are refused) and then
every connection on its port (TCP FIN): a client sees its connection close, and any call it had sent
but not had answered fails with UNAVAILABLE, which says "send it again". Only then is gRPC stopped,
with no client left to cancel anything on.

Linux only (the sockets are found through /proc); elsewhere nothing is closed and the stop is gRPC's.
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

log = logging.getLogger(__name__)

TCP_LISTEN, TCP_ESTABLISHED = "0A", "01"  # connection states in /proc/net/tcp (include/net/tcp_states.h)


def _sockets_on_port(port: int) -> dict[int, str]:
    """inode -> state of every TCP socket in this network namespace whose local port is ``port``."""
    found: dict[int, str] = {}
    for table in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, state, inode = fields[1], fields[3], int(fields[9])
            if int(local.rsplit(":", 1)[1], 16) == port and inode:
                found[inode] = state
    return found


def _own_socket_fds() -> dict[int, list[int]]:
    """inode -> the file descriptors of every socket this process holds."""
    fds: dict[int, list[int]] = {}
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:
        return fds
    for name in names:
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue  # closed meanwhile
        if target.startswith("socket:["):
            fds.setdefault(int(target[8:-1]), []).append(int(name))
    return fds


def close_port(port: int) -> tuple[int, int]:
    """Closes this process's listening sockets on ``port``, then shuts down its connections there;
    every file descriptor stays gRPC's to close. Returns (listeners, connections) closed."""
    on_port = _sockets_on_port(port)
    fds = _own_socket_fds()
    ours = {inode: fds[inode] for inode in on_port if inode in fds}
    listeners = [fds for inode, fds in ours.items() if on_port[inode] == TCP_LISTEN]
    connections = [fds[0] for inode, fds in ours.items() if on_port[inode] != TCP_LISTEN]
    closed = [0, 0]
    for descriptors in listeners:  # first: no new connection meanwhile
        # A fresh unbound socket takes each descriptor's place, so the listening socket is closed (the
        # port refuses connections) while gRPC's descriptors stay valid. shutdown() would close it
        # too, but gRPC's acceptor then logs its failed accept() as an error.
        with socket.socket() as placeholder:
            for fd in descriptors:
                os.dup2(placeholder.fileno(), fd)
        closed[0] += 1
    for fd in connections:
        try:
            with socket.socket(fileno=os.dup(fd)) as sock:  # a duplicate: gRPC's descriptor stays open
                sock.shutdown(socket.SHUT_RDWR)  # FIN: the client sees the connection end
            closed[1] += 1
        except OSError as exc:  # closed meanwhile
            log.debug("cannot shut down fd %d: %s", fd, exc)
    return closed[0], closed[1]
