"""Virtual time against the real HTTP stack: the planner's check on itself.

One layout runs twice on the same profile and requests: as real processes (simulators, and the
router for DI) measured by `di-router bench`'s `runner.execute`, and in virtual time
(`simulate`, on the sizes the servers counted). TTFT and ITL (the bench's headline, a request's
mean gap after its first token) must agree within 5 % at p50 and 10 % at p99, throughput within
5 % (issue 13). Both sides see the same load, measured the same way:
- the same arrivals: the virtual run replays the real run's send times, since the load
  generator's timers run late on a busy machine (~1 ms per request, adding up over a run: tens
  of ms by the 16th request, enough to move a request in or out of another's queue);
- warm servers and client: before measuring, every real server has served a request and the
  client process has sent one, since the first request of a process pays for lazy imports and
  code paths (~20 ms, a tenth of a TTFT here), which no model of a server holds.

A layout with P != D pairs any prefill with any decode, which only Neuron 2.26's etcd discovery
does: its workers register in etcd (`--kv-transfer-config` naming it) and the router follows
the registry (`--etcd`); each leg's request id names its peer (`docs/discovery.md`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx

from di_router import argv
from di_router.bench import loadgen, runner, stack
from di_router.bench.loadgen import RequestSpec, Summary
from di_router.bench.tokenizer import SimTokenizer
from di_router.plan.commands import etcd_kv_config
from di_router.plan.layouts import Layout
from di_router.plan.simulate import Load, simulate
from di_router.sim.profiles import PROFILES

SELECTION = "round_robin"
"""Both routers, real and virtual, take servers in turn: the same pick for the same request."""
P50_TOLERANCE, P99_TOLERANCE, THROUGHPUT_TOLERANCE = 0.05, 0.10, 0.05
REGISTRY_TIMEOUT_S = 15.0


@dataclass(frozen=True)
class Check:
    """One metric, virtual against real."""

    metric: str
    virtual: float
    real: float
    tolerance: float

    @property
    def error(self) -> float:
        """Relative to the real run's value."""
        return abs(self.virtual - self.real) / self.real

    @property
    def ok(self) -> bool:
        return self.error <= self.tolerance

    def __str__(self) -> str:
        return (
            f"{self.metric}: virtual {self.virtual:.4f} vs real {self.real:.4f} "
            f"({100 * self.error:.1f} %, tolerance {self.tolerance:.0%})"
        )


@dataclass(frozen=True)
class Agreement:
    layout: Layout
    specs: list[RequestSpec]
    """The requests as the servers counted them (prompt sizes from their usage)."""
    virtual: Summary
    real: Summary
    checks: list[Check]

    @property
    def failures(self) -> list[Check]:
        return [check for check in self.checks if not check.ok]


def compare(virtual: Summary, real: Summary) -> list[Check]:
    """TTFT and ITL at p50 and p99, and completed requests per minute."""
    checks = []
    for metric in ("ttft_s", "itl_neuron_s"):
        v, r = getattr(virtual, metric), getattr(real, metric)
        checks += [
            Check(f"{metric} p50", v.p50, r.p50, P50_TOLERANCE),
            Check(f"{metric} p99", v.p99, r.p99, P99_TOLERANCE),
        ]
    rpm = virtual.requests_per_minute, real.requests_per_minute
    return [*checks, Check("req/min", *rpm, THROUGHPUT_TOLERANCE)]


def agreement(
    layout: Layout, profile: str, workload: runner.Workload, etcd: str | None = None
) -> Agreement:
    """Run `workload` through `layout` for real (etcd `HOST:PORT` needed when P != D), then in
    virtual time on the request sizes the servers counted, and compare."""
    with real_stack(layout, profile, etcd) as url:
        warm_up(url, workload, layout.server_count)
        real = runner.execute(workload, SimTokenizer(), url)
    if real.stats.errors:
        raise RuntimeError(f"{layout.name}: real run failed: {real.stats.error_messages}")
    specs = [
        RequestSpec("", spec.max_tokens, result.prompt_tokens)
        for spec, result in zip(real.specs, real.run.results, strict=True)
    ]
    first = min(result.send_time for result in real.run.results)
    load = Load(arrivals=tuple(result.send_time - first for result in real.run.results))
    virtual = simulate(layout, PROFILES[profile], specs, load, SELECTION).summary()
    return Agreement(layout, specs, virtual, real.stats, compare(virtual, real.stats))


def warm_up(url: str, workload: runner.Workload, servers: int) -> None:
    """One short request per server at once (taken in turn, each server gets one), from this
    process, so neither side of the measurement pays a first request's costs."""
    config = loadgen.LoadConfig(
        url, model=workload.model, endpoint=workload.endpoint, concurrency=servers
    )
    spec = RequestSpec(loadgen.make_prompt(8), 2, 8)

    async def send() -> None:
        async with loadgen.make_client(config) as client:
            await loadgen.warm_up(config, spec, client)

    asyncio.run(send())


@contextlib.contextmanager
def real_stack(layout: Layout, profile: str, etcd: str | None = None) -> Iterator[str]:
    """The layout as real processes on loopback; yields the URL clients send to. Supported: one
    colocated server, 1P1D (Neuron 2.24's fixed pair), and any xPyD with P != D (etcd)."""
    if layout.kind == "baseline" and layout.servers == 1:
        with stack.baseline(profile, layout.batch) as running:
            yield running.url
    elif layout.static_pairing and layout.prefills == 1:
        with stack.di(profile, layout.batch, router_args=["--selection", SELECTION]) as running:
            yield running.url
    elif not layout.static_pairing and layout.kind == "di":
        if etcd is None:
            raise ValueError(f"{layout.name} pairs any-to-any: it needs an etcd HOST:PORT")
        with etcd_stack(layout, profile, etcd) as url:
            yield url
    else:
        raise ValueError(f"no real stack for {layout.name}")


@contextlib.contextmanager
def etcd_stack(layout: Layout, profile: str, etcd: str) -> Iterator[str]:
    """Neuron 2.26 workers registered in etcd, and the router following the registry."""
    servers: list[stack.Server] = []
    try:
        for role, count in (("prefill", layout.prefills), ("decode", layout.decodes)):
            for i in range(count):
                port = stack.free_port(consecutive=2)  # a producer's KV channel is on port + 1
                servers.append(_etcd_worker(f"{role}{i}", role, port, profile, layout, etcd))
        stack.wait_ready(servers, "/health")
        port = stack.free_port()
        router_args = ["--etcd", etcd, "--selection", SELECTION]
        router = stack.Server(
            "router", stack.router_argv(port, 0, 0, router_args), f"http://{stack.HOST}:{port}"
        )
        servers.append(router)
        _wait_registered(router, {s.url for s in servers[:-1]})
        yield router.url
    finally:
        for server in reversed(servers):
            server.stop()


def _etcd_worker(
    name: str, role: str, port: int, profile: str, layout: Layout, etcd: str
) -> stack.Server:
    command = argv.server_argv(
        "sim",
        model=stack.MODEL,
        port=port,
        host=stack.HOST,
        kv_config=etcd_kv_config(role, etcd),  # what the plan prints for P != D
        vllm_flags=["--max-num-seqs", str(layout.batch)],
        extra=["--sim-profile", profile],
    )
    return stack.Server(name, command, f"http://{stack.HOST}:{port}")


def _wait_registered(router: stack.Server, urls: set[str]) -> None:
    """Bounded poll until the router has found every worker in etcd and seen it healthy."""
    stack.wait_ready([router], "/ready", REGISTRY_TIMEOUT_S)
    deadline = time.monotonic() + REGISTRY_TIMEOUT_S
    with httpx.Client(timeout=2.0) as client:
        while True:
            rows = client.get(router.url + "/backends").json()["backends"]
            if {row["url"] for row in rows if row["state"] == "up"} == urls:
                return
            if time.monotonic() > deadline:
                raise stack.StackError(f"router sees {rows}, expected {sorted(urls)}")
            time.sleep(0.05)
