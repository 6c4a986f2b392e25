"""Whether the TCP ports a launch needs are free, checked before anything is started."""

from __future__ import annotations

import socket
from collections.abc import Mapping

from di_router.launcher.settings import LaunchError

ALL_INTERFACES = "0.0.0.0"


def port_in_use(port: int, host: str = ALL_INTERFACES) -> bool:
    """Try the bind the server will do; SO_REUSEADDR as servers set it, so TIME_WAIT is free."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def busy_port_problems(ports: Mapping[str, int], host: str = ALL_INTERFACES) -> list[str]:
    """One message per busy port, keyed by the flag that chooses it."""
    return [
        f"{flag} {port} is already in use on this host: stop what holds it "
        f"(`ss -ltnp 'sport = :{port}'`) or choose another port with {flag}"
        for flag, port in ports.items()
        if port_in_use(port, host)
    ]


def ensure_ports_free(ports: Mapping[str, int], host: str = ALL_INTERFACES) -> None:
    """Every port distinct and bindable, or a LaunchError naming each flag to change."""
    by_port: dict[int, list[str]] = {}
    for flag, port in ports.items():
        by_port.setdefault(port, []).append(flag)
    problems = [
        f"{' and '.join(flags)} are all {port}: each server needs its own port"
        for port, flags in by_port.items()
        if len(flags) > 1
    ]
    problems += busy_port_problems(ports, host)
    if problems:
        raise LaunchError("; ".join(problems))
