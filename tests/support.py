"""Start the simulator and the router as a user would (real processes, real sockets).

The process handling is the library's own (`di_router.bench.stack`), which benchmarks use too.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from di_router.bench.stack import MODEL, free_port, router_argv, sim_argv
from di_router.bench.stack import Server as Proc

__all__ = [
    "MODEL",
    "DIStack",
    "DeadBackend",
    "Proc",
    "di_stack",
    "free_port",
    "free_port_pair",
    "kv_config",
    "needs_curl",
    "running",
    "samples",
    "scrape",
    "sim_stats",
    "start_router",
    "start_sim",
    "value",
    "wait_until",
]

ROUTER_TEST_FLAGS = ("--health-interval", "0.2")
needs_curl = pytest.mark.skipif(
    shutil.which("curl") is None, reason="curl is not installed (.ci/run installs it)"
)


def free_port_pair() -> int:
    """A port whose next one is free too: a Neuron 2.26 producer's KV side channel listens on
    its HTTP port + 1."""
    return free_port(consecutive=2)


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
    return json.dumps(
        {
            "kv_connector": "NeuronConnector",
            "kv_buffer_device": "cpu",
            "kv_role": role,
            "kv_rank": 0 if role == "kv_producer" else 1,
            "kv_parallel_size": 2,
            "kv_buffer_size": 2e11,
            "kv_ip": "127.0.0.1",
            "kv_port": kv_port,
            "neuron_core_offset": 0,
        }
    )


def start_sim(
    role: str,
    *,
    kv_port: int | None = None,
    profile: str = "instant",
    extra: Sequence[str] = (),
    name: str | None = None,
    port: int | None = None,
) -> Proc:
    """role: baseline | prefill | decode. Prefill and decode of one pair share `kv_port`."""
    assert role == "baseline" or kv_port is not None
    port = port or free_port()
    argv = sim_argv(role, port, kv_port or 0, profile, 256, extra)
    return Proc(name or role, argv, f"http://127.0.0.1:{port}")


@dataclass
class DeadBackend:
    """A backend address where nothing listens (connections are refused)."""

    url: str

    @classmethod
    def make(cls) -> DeadBackend:
        return cls(f"http://127.0.0.1:{free_port()}")


def start_router(
    prefill: Proc | DeadBackend,
    decode: Proc | DeadBackend,
    extra: Sequence[str] = (),
    env: dict[str, str] | None = None,
    stderr_to: Path | None = None,
) -> Proc:
    """`stderr_to` splits the router's stderr off, so its log holds stdout alone."""
    port = free_port()
    p_port = int(prefill.url.rsplit(":", 1)[1])
    d_port = int(decode.url.rsplit(":", 1)[1])
    argv = router_argv(port, p_port, d_port, extra)
    if stderr_to is not None:  # exec keeps the pid, so Proc.stop() still reaches the router
        argv = ["sh", "-c", f'exec "$@" 2>>"{stderr_to}"', "sh", *argv]
    return Proc("router", argv, f"http://127.0.0.1:{port}", env)


@dataclass
class DIStack:
    prefill: Proc | DeadBackend
    decode: Proc | DeadBackend
    router: Proc
    kv_port: int
    baseline: Proc | None = None
    router_stderr: Path | None = None

    @property
    def sims(self) -> list[Proc]:
        return [p for p in (self.prefill, self.decode) if isinstance(p, Proc)]


@contextlib.contextmanager
def di_stack(
    *,
    sim_extra: Sequence[str] = (),
    prefill_extra: Sequence[str] | None = (),
    decode_extra: Sequence[str] | None = (),
    router_extra: Sequence[str] = (),
    env: dict[str, str] | None = None,
    baseline: bool = False,
    router_stderr: Path | None = None,
) -> Iterator[DIStack]:
    """Prefill and decode sims (`None`: a dead address instead) and a router, plus optionally a
    baseline sim with the same `sim_extra`. With both backends alive, waits for /ready.

    A server serves only once paired with its KV peer (as Neuron's do), so a "dead" backend is
    started, paired and then stopped: its peer is left as after a crash of the other side."""
    kv_port = free_port()
    procs: list[Proc] = []

    def sim(role: str, extra: Sequence[str] | None) -> Proc:
        procs.append(start_sim(role, kv_port=kv_port, extra=[*sim_extra, *(extra or ())]))
        return procs[-1]

    base = sim("baseline", ()) if baseline else None
    prefill, decode = sim("prefill", prefill_extra), sim("decode", decode_extra)
    router = start_router(prefill, decode, [*ROUTER_TEST_FLAGS, *router_extra], env, router_stderr)
    with running(*procs, router):
        backends: dict[str, Proc | DeadBackend] = {"prefill": prefill, "decode": decode}
        for role, extra in (("prefill", prefill_extra), ("decode", decode_extra)):
            if extra is None:
                backends[role].stop()  # type: ignore[union-attr]
                backends[role] = DeadBackend(backends[role].url)
        if prefill_extra is not None and decode_extra is not None:
            router.wait_ready("/ready", timeout=15)
        yield DIStack(backends["prefill"], backends["decode"], router, kv_port, base, router_stderr)


@contextlib.contextmanager
def running(*procs: Proc) -> Iterator[tuple[Proc, ...]]:
    try:
        for proc in procs:
            proc.wait_ready()
        yield procs
    finally:
        for proc in reversed(procs):
            proc.stop(now=True)  # nothing is checked after a test: no 5 s of settling either


def scrape(url: str) -> str:
    """One /metrics scrape on a new connection (with several workers, any worker may answer)."""
    response = httpx.get(url + "/metrics", timeout=5, headers={"Connection": "close"})
    assert response.status_code == 200, response.text
    return response.text


def samples(text: str) -> list[Sample]:
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def value(text: str, name: str, **labels: str) -> float:
    """Sum of the samples called exactly `name` whose labels include `labels`."""
    return sum(
        s.value
        for s in samples(text)
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


def sim_stats(proc: Proc) -> dict[str, Any]:
    return httpx.get(proc.url + "/sim/stats", timeout=5).json()
