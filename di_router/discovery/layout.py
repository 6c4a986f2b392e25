"""The registry layout workers and routers agree on: `/workers/<prefill|decode>/<ip>/<port>`.

Neuron 2.26's xPyD workers publish that key under a lease and its `neuron-proxy-server --etcd`
lists the prefix; the port is the worker's OpenAI API port. Everything about a worker is in the
key, so the value is free-form (only for people reading the registry with `etcdctl`).
"""

from __future__ import annotations

from typing import Literal, NamedTuple
from urllib.parse import urlsplit

WORKERS_PREFIX = "/workers/"
WorkerRole = Literal["prefill", "decode"]
ROLES: tuple[WorkerRole, ...] = ("prefill", "decode")


class Worker(NamedTuple):
    """A worker's API address, as registered (an IP, or a host name someone registered)."""

    ip: str
    port: int


def worker_key(role: WorkerRole, worker: Worker) -> str:
    return f"{WORKERS_PREFIX}{role}/{worker.ip}/{worker.port}"


def parse_worker_key(key: str) -> tuple[WorkerRole, Worker] | None:
    """The role and address a key names, or None for any other key under the prefix."""
    if not key.startswith(WORKERS_PREFIX):
        return None
    parts = key[len(WORKERS_PREFIX) :].split("/")
    if len(parts) != 3:
        return None
    role, ip, port = parts
    for known in ROLES:  # narrows `role` to the Literal without a cast
        if role == known and ip and port.isdigit() and 0 < int(port) < 65536:
            return known, Worker(ip, int(port))
    return None


def endpoint_url(endpoint: str) -> str:
    """The base URL of an etcd client endpoint given as `HOST:PORT` (how Neuron's
    `--kv-transfer-config` and `--etcd` spell it) or as an `http(s)://` URL."""
    url = endpoint if "://" in endpoint else f"http://{endpoint}"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"etcd endpoint {endpoint!r}: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname or port is None:
        raise ValueError(f"etcd endpoint {endpoint!r} is not HOST:PORT or http(s)://HOST:PORT")
    if parts.path.strip("/") or parts.query or parts.fragment:
        raise ValueError(f"etcd endpoint {endpoint!r} has a path; give HOST:PORT only")
    return f"{parts.scheme}://{parts.netloc}"
