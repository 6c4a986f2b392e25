"""Requests/s through one router process in front of N static pairs of `instant` simulators,
against one `instant` simulator reached directly (issue 12).

    python benchmarks/pairs_throughput.py [--pairs 4] [--concurrency 64] [--seconds 10]

The client is `load_client.py`'s closed loop (16-token streams, `ignore_eos`), warmed first; the
servers are the processes a user runs, started with the same argv builders as `di-router up`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from load_client import client_session, closed_loop, completion_body

from di_router import argv
from di_router.bench import stack

TOKENS = 16


@contextlib.contextmanager
def servers(pairs: int) -> Iterator[tuple[str, str]]:
    """(direct URL, router URL): one baseline simulator, and the router in front of `pairs`."""
    started: list[stack.Server] = []

    def start(name: str, args: list[str], port: int) -> stack.Server:
        started.append(stack.Server(name, args, f"http://{stack.HOST}:{port}"))
        return started[-1]

    try:
        port = stack.free_port()
        base = start("baseline", stack.sim_argv("baseline", port, 0, "instant", 1024), port)
        urls = []
        for i in range(pairs):
            kv = stack.free_port()
            pair = []
            for role in ("prefill", "decode"):
                port = stack.free_port()
                pair.append(
                    start(f"{role}{i}", stack.sim_argv(role, port, kv, "instant", 1024), port).url
                )
            urls.append((pair[0], pair[1]))
        stack.wait_ready(started, "/health")
        port = stack.free_port()
        router = start("router", argv.router_argv(stack.HOST, port, urls), port)
        stack.wait_ready([router], "/ready")
        yield base.url, router.url
    finally:
        for server in reversed(started):
            server.stop()


async def measure(url: str, concurrency: int, seconds: float) -> dict[str, object]:
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
    with servers(args.pairs) as (direct, router):
        results = {
            "direct (1 baseline)": asyncio.run(measure(direct, args.concurrency, args.seconds)),
            f"router ({args.pairs} pairs)": asyncio.run(
                measure(router, args.concurrency, args.seconds)
            ),
        }
    for name, result in results.items():
        print(
            f"{name:22} {result['requests_per_s']:8.1f} req/s  ok {result['ok']}  "
            f"errors {result['errors']}  TTFT p50 {result['ttft_p50_s'] * 1000:.1f} ms  "
            f"p99 {result['ttft_p99_s'] * 1000:.1f} ms"
        )
    print(json.dumps(results, indent=1))
    return 0 if all(r["errors"] == 0 for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
