"""Start the simulator and the router as a user would (real processes, real sockets)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx

MODEL = "llama-3.3-70b"
READY_TIMEOUT_S = 30.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.02):
    """Bounded poll: return the first truthy value of `predicate`, or fail naming `what`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class Proc:
    """A server subprocess with its output in a log file and a readiness probe."""

    def __init__(self, name: str, argv: Sequence[str], url: str, env: dict[str, str] | None = None):
        self.name = name
        self.url = url
        self.log_path = Path(tempfile.mkstemp(prefix=f"{name}-", suffix=".log")[1])
        self._log = self.log_path.open("wb")
        self.popen = subprocess.Popen(
            list(argv), stdout=self._log, stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})}, start_new_session=True,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, path: str = "/health", timeout: float = READY_TIMEOUT_S) -> Proc:
        def ready() -> bool:
            if self.popen.poll() is not None:
                raise AssertionError(f"{self.name} exited {self.popen.returncode}:\n{self.log()}")
            try:
                return httpx.get(self.url + path, timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(ready, timeout, f"{self.name} at {self.url}{path}")
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10) -> int:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(timeout)
        self._log.close()
        return self.popen.returncode


def kv_config(role: str, kv_port: int) -> str:
    return json.dumps({
        "kv_connector": "NeuronConnector", "kv_buffer_device": "cpu",
        "kv_role": role, "kv_rank": 0 if role == "kv_producer" else 1,
        "kv_parallel_size": 2, "kv_buffer_size": 2e11, "kv_ip": "127.0.0.1",
        "kv_port": kv_port, "neuron_core_offset": 0,
    })


def start_sim(
    role: str, *, kv_port: int | None = None, profile: str = "instant",
    extra: Sequence[str] = (), name: str | None = None,
) -> Proc:
    """role: baseline | prefill | decode. Prefill and decode of one pair share `kv_port`."""
    port = free_port()
    argv = [sys.executable, "-m", "di_router.sim.api_server", "--model", MODEL,
            "--host", "127.0.0.1", "--port", str(port), "--sim-profile", profile]
    if role != "baseline":
        assert kv_port is not None
        kv_role = "kv_producer" if role == "prefill" else "kv_consumer"
        argv += ["--kv-transfer-config", kv_config(kv_role, kv_port)]
    return Proc(name or role, [*argv, *extra], f"http://127.0.0.1:{port}")


def start_router(prefill: Proc, decode: Proc, extra: Sequence[str] = (),
                 env: dict[str, str] | None = None) -> Proc:
    port = free_port()
    p_port = prefill.url.rsplit(":", 1)[1]
    d_port = decode.url.rsplit(":", 1)[1]
    argv = [sys.executable, "-m", "di_router.router.cli",
            "--prefill-ip", "127.0.0.1", "--prefill-port", p_port,
            "--decode-ip", "127.0.0.1", "--decode-port", d_port,
            "--host", "127.0.0.1", "--port", str(port), *extra]
    return Proc("router", argv, f"http://127.0.0.1:{port}", env)


@contextlib.contextmanager
def running(*procs: Proc) -> Iterator[tuple[Proc, ...]]:
    try:
        for proc in procs:
            proc.wait_ready()
        yield procs
    finally:
        for proc in reversed(procs):
            proc.stop()


def sim_stats(proc: Proc) -> dict[str, Any]:
    return httpx.get(proc.url + "/sim/stats", timeout=5).json()
