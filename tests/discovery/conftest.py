"""A real etcd server per test (Debian package `etcd-server`), on free loopback ports.

Coroutine tests run on asyncio through anyio's pytest plugin (anyio comes with httpx).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import Proc, free_port

ETCD = shutil.which("etcd")
needs_etcd = pytest.mark.skipif(
    ETCD is None, reason="etcd is not installed (.ci/run installs the Debian package etcd-server)"
)


class EtcdServer:
    """One etcd member. `restart(fresh=True)` brings it back without its data, as after a host
    replacement: its leases are gone."""

    def __init__(self) -> None:
        self.port, self.peer_port = free_port(), free_port()
        self.endpoint = f"127.0.0.1:{self.port}"
        self._root = Path(tempfile.mkdtemp(prefix="etcd-"))
        self._generation = 0
        self.proc = self._start()

    def _start(self) -> Proc:
        assert ETCD is not None
        peer = f"http://127.0.0.1:{self.peer_port}"
        client = f"http://{self.endpoint}"
        argv = [
            ETCD,
            "--name=test",
            f"--data-dir={self._root / f'data{self._generation}'}",
            f"--listen-client-urls={client}",
            f"--advertise-client-urls={client}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=test={peer}",
            # Fast election, and a minimum lease TTL of 2 s (3 x election ticks x heartbeat).
            "--heartbeat-interval=50",
            "--election-timeout=500",
        ]
        proc = Proc("etcd", argv, client)
        proc.wait_ready("/health", timeout=15)
        return proc

    def stop(self) -> None:
        self.proc.stop()

    def restart(self, fresh: bool) -> None:
        if fresh:
            self._generation += 1
        self.proc = self._start()

    def close(self) -> None:
        self.proc.stop()
        shutil.rmtree(self._root, ignore_errors=True)


@pytest.fixture
def etcd() -> Iterator[EtcdServer]:
    server = EtcdServer()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
