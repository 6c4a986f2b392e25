"""What the router's process shows from outside: its access lines, its sockets to the backends,
and raw HTTP exchanges that no well-behaved client library would produce."""

from __future__ import annotations

import contextlib
import os
import re
import socket
from collections import Counter
from pathlib import Path

import h11

from tests.support import Proc

_FIELD = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)')
_TCP_STATES = {
    "01": "ESTABLISHED",
    "02": "SYN_SENT",
    "04": "FIN_WAIT1",
    "05": "FIN_WAIT2",
    "06": "TIME_WAIT",
    "07": "CLOSE",
    "08": "CLOSE_WAIT",
    "09": "LAST_ACK",
    "0A": "LISTEN",
    "0B": "CLOSING",
}


def access_lines(router: Proc) -> dict[str, dict[str, str]]:
    """router_id -> the fields of its access line (text format), from the router's log."""
    lines: dict[str, dict[str, str]] = {}
    for line in router.log().splitlines():
        _, found, rest = line.partition(":di_router.access:")
        if found:
            fields = dict(_FIELD.findall(rest))
            lines[fields["router_id"]] = fields
    return lines


def statuses(router: Proc) -> Counter[str]:
    """How many access lines have each status."""
    return Counter(fields["status"] for fields in access_lines(router).values())


def backend_sockets(pid: int, ports: set[int]) -> Counter[str]:
    """TCP states of the sockets process `pid` holds to any of `ports` (what `ss -tnp` shows)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    states: Counter[str] = Counter()
    for table in ("tcp", "tcp6"):
        for row in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = row.split()
            remote_port = int(fields[2].rsplit(":", 1)[1], 16)
            if fields[9] in inodes and remote_port in ports:
                states[_TCP_STATES.get(fields[3], fields[3])] += 1
    return states


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def request_head(path: str, length: int, content_type: str = "application/json") -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {length}\r\n\r\n"
    ).encode()


def send_and_close(url: str, path: str, body: bytes) -> None:
    """A whole request, then the connection closed at once (before any answer)."""
    with socket.create_connection(("127.0.0.1", port_of(url)), timeout=5) as sock:
        sock.sendall(request_head(path, len(body)) + body)


def read_response(sock: socket.socket) -> tuple[int, bytes]:
    """Status and body of the one answer on `sock` (parsed by h11, chunked or not); the
    socket's own timeout bounds each read."""
    conn = h11.Connection(h11.CLIENT)
    conn.send(
        h11.Request(method="POST", target="/", headers=[("Host", "x"), ("Content-Length", "0")])
    )
    status, body = 0, b""
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(sock.recv(65536))
        elif isinstance(event, h11.Response):
            status = event.status_code
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
            return status, body
