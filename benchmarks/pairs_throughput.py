"""Requests/s through one router process in front of N static pairs of `instant` simulators and
in front of NPND registered in etcd, against one `instant` simulator reached directly (issue 12).

    python benchmarks/pairs_throughput.py [--pairs 4] [--concurrency 64] [--seconds 10]

The client is `load_client.py`'s closed loop (16-token streams, `ignore_eos`), warmed first; the
servers are the processes a user runs, started with the same argv builders as `di-router up`.
Each target runs alone (its servers are stopped before the next starts). The etcd mode needs
Debian's `etcd-server`; without it that row is skipped.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the test suite's etcd server

from load_client import client_session, closed_loop, completion_body

from di_router import argv
from di_router.bench import stack
from di_router.plan.agreement import etcd_stack
from di_router.plan.layouts import Layout
from tests.discovery.conftest import EtcdServer

TOKENS = 16
BATCH = 1024
PROFILE = "instant"


@contextlib.contextmanager
def _started() -> Iterator[Callable[[str, list[str], int], stack.Server]]:
    """A starter of servers on loopback that stops every one it started, last first."""
    started: list[stack.Server] = []

    def start(name: str, args: list[str], port: int) -> stack.Server:
        started.append(stack.Server(name, args, f"http://{stack.HOST}:{port}"))
        return started[-1]

    try:
        yield start
    finally:
        for server in reversed(started):
            server.stop()


@contextlib.contextmanager
def direct() -> Iterator[str]:
    """One baseline simulator."""
    with _started() as start:
        port = stack.free_port()
        base = start("baseline", stack.sim_argv("baseline", port, 0, PROFILE, BATCH), port)
        yield base.wait_ready().url


@contextlib.contextmanager
def static_pairs(pairs: int) -> Iterator[str]:
    """The router in front of `pairs` Neuron 2.24 pairs, the i-th prefill with the i-th decode."""
    with _started() as start:
        urls, servers = [], []
        for i in range(pairs):
            kv = stack.free_port()
            for role in ("prefill", "decode"):
                port = stack.free_port()
                servers.append(
                    start(f"{role}{i}", stack.sim_argv(role, port, kv, PROFILE, BATCH), port)
                )
            urls.append((servers[-2].url, servers[-1].url))
        stack.wait_ready(servers, "/health")
        port = stack.free_port()
        yield (
            start("router", argv.router_argv(stack.HOST, port, urls), port).wait_ready("/ready").url
        )


@contextlib.contextmanager
def etcd_workers(pairs: int) -> Iterator[str]:
    """The router with `--etcd` in front of `pairs` prefill and `pairs` decode workers that
    registered in a real etcd (Neuron 2.26's any-to-any pairing), once it sees all of them up."""
    etcd = EtcdServer()
    try:
        layout = Layout("di", 1, BATCH, prefills=pairs, decodes=pairs)
        with etcd_stack(layout, PROFILE, etcd.endpoint) as url:
            yield url
    finally:
        etcd.close()


async def measure(url: str, concurrency: int, seconds: float) -> dict[str, Any]:
    body = completion_body(TOKENS, stack.MODEL)
    async with client_session(concurrency) as session:
        target = url + "/v1/completions"
        await closed_loop(
            session, target, completion_body(2, stack.MODEL), 2, concurrency, concurrency
        )
        result = await closed_loop(session, target, body, TOKENS, concurrency, duration_s=seconds)
    return result.to_dict()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    n = args.pairs
    targets: dict[str, contextlib.AbstractContextManager[str]] = {
        "direct (1 baseline)": direct(),
        f"router ({n} static pairs)": static_pairs(n),
    }
    if shutil.which("etcd"):
        targets[f"router ({n}P{n}D etcd)"] = etcd_workers(n)
    results = {}
    for name, target in targets.items():
        with target as url:
            results[name] = asyncio.run(measure(url, args.concurrency, args.seconds))
    for name, result in results.items():
        print(
            f"{name:24} {result['requests_per_s']:8.1f} req/s  ok {result['ok']}  "
            f"errors {result['errors']}  TTFT p50 {result['ttft_p50_s'] * 1000:.1f} ms  "
            f"p99 {result['ttft_p99_s'] * 1000:.1f} ms"
        )
    print(json.dumps(results, indent=1))
    return 0 if all(r["errors"] == 0 for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
