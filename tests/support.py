"""Start the simulator and the router as a user would (real processes, real sockets).

The process handling is the library's own (`di_router.bench.stack`), which benchmarks use too.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import httpx

from di_router.bench.stack import MODEL, free_port, router_argv, sim_argv
from di_router.bench.stack import Server as Proc

__all__ = ["MODEL", "Proc", "free_port", "kv_config", "running", "sim_stats", "start_router",
           "start_sim", "wait_until"]


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


def kv_config(role: str, kv_port: int) -> str:
    return json.dumps({
        "kv_connector": "NeuronConnector", "kv_buffer_device": "cpu",
        "kv_role": role, "kv_rank": 0 if role == "kv_producer" else 1,
        "kv_parallel_size": 2, "kv_buffer_size": 2e11, "kv_ip": "127.0.0.1",
        "kv_port": kv_port, "neuron_core_offset": 0,
    })


def start_sim(
    role: str, *, kv_port: int | None = None, profile: str = "instant",
    extra: Sequence[str] = (), name: str | None = None, port: int | None = None,
) -> Proc:
    """role: baseline | prefill | decode. Prefill and decode of one pair share `kv_port`."""
    assert role == "baseline" or kv_port is not None
    port = port or free_port()
    argv = sim_argv(role, port, kv_port or 0, profile, 256, extra)
    return Proc(name or role, argv, f"http://127.0.0.1:{port}")


def start_router(prefill: Proc, decode: Proc, extra: Sequence[str] = (),
                 env: dict[str, str] | None = None) -> Proc:
    port = free_port()
    p_port = int(prefill.url.rsplit(":", 1)[1])
    d_port = int(decode.url.rsplit(":", 1)[1])
    return Proc("router", router_argv(port, p_port, d_port, extra),
                f"http://127.0.0.1:{port}", env)


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
