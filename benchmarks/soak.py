"""Soak (issue 10): 10,000 streaming requests at concurrency 256 through the router, with 1 % of
requests faulted by the simulators and 5 % of clients leaving mid-stream.

It passes when every request ends as its cause says it should (a faulted one with an error the
client can read: an HTTP error or an SSE error event and `[DONE]`; a client that leaves is not
an error; every other one complete with exactly its tokens), the router's RSS grows less than
10 % after warm-up, and its descriptors and sockets come back to their count after warm-up.

    python benchmarks/soak.py [--requests 10000] [--concurrency 256]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import orjson

from di_router.bench import stack
from di_router.bench.stack import MODEL

RESULTS = Path(__file__).parent / "results" / "soak.json"
TOKENS = 16
FAULTS = ["--sim-fault-rate", "0.005", "--sim-fault-status", "503", "--sim-fault-drop"]
"""Half a percent on each leg, so about 1 % of requests meet a fault."""


def settle(di: stack.Stack, timeout_s: float = 60.0) -> None:
    """Bounded poll until the router holds no request and both simulators no slot (rescues and
    releases run in the background after a request ended)."""
    deadline = time.monotonic() + timeout_s
    while True:
        router = httpx.get(di.url + "/ready", timeout=5).json()
        sims = [httpx.get(di.urls[role] + "/sim/stats", timeout=5).json()
                for role in ("prefill", "decode")]  # fmt: skip
        if not router["orphaned_decodes"] and all(not s["slots_in_use"] for s in sims):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"the stack did not settle: {router} {sims}")
        time.sleep(0.2)


def descriptors(pid: int) -> Counter[str]:
    """The router's open descriptors by kind (socket, pipe, file...)."""
    kinds: Counter[str] = Counter()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = fd.readlink().as_posix()
        except OSError:
            continue
        kinds[target.split(":", 1)[0] if ":" in target else "file"] += 1
    return kinds


async def one(session: aiohttp.ClientSession, url: str, leave: bool) -> str:
    body = {"model": MODEL, "prompt": f"soak {random.random()}", "max_tokens": TOKENS,
            "ignore_eos": True, "stream": True}  # fmt: skip
    try:
        async with session.post(url, data=orjson.dumps(body)) as response:
            if response.status != 200:
                error = orjson.loads(await response.read())
                return "http_error" if error.get("object") == "error" else "bad_error_body"
            raw = b""
            async for chunk in response.content.iter_any():
                raw += chunk
                if leave and raw.count(b"data: ") >= TOKENS // 2:
                    return "left"
    except (aiohttp.ClientError, TimeoutError) as exc:
        return f"transport: {type(exc).__name__}"
    if not raw.endswith(b"data: [DONE]\n\n"):
        return "no_done"
    if b'{"error"' in raw:
        return "stream_error"
    tokens = raw.count(b"data: ") - 1
    return "ok" if tokens == TOKENS else f"tokens_{tokens}"


async def load(url: str, requests: int, concurrency: int, seed: int) -> Counter[str]:
    rng = random.Random(seed)
    plan = [rng.random() < 0.05 for _ in range(requests)]
    outcomes: Counter[str] = Counter()
    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def worker() -> None:
            while plan:
                outcomes[await one(session, url + "/v1/completions", plan.pop())] += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return outcomes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=10_000)
    p.add_argument("--concurrency", type=int, default=256)
    p.add_argument("--warm-up", type=int, default=1_000)
    p.add_argument("--output", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    expected = {"ok", "left", "http_error", "stream_error"}
    with stack.di("instant", batch=512, sim_args=FAULTS) as di:
        router = di.router
        assert router is not None
        asyncio.run(load(di.url, args.warm_up, args.concurrency, seed=1))
        settle(di)
        rss_start, fds_start = stack.rss_bytes(router.pid), descriptors(router.pid)
        started = time.monotonic()
        outcomes = asyncio.run(load(di.url, args.requests, args.concurrency, seed=2))
        elapsed = time.monotonic() - started
        settle(di)
        rss_end, fds_end = stack.rss_bytes(router.pid), descriptors(router.pid)
        peak = stack.rss_bytes(router.pid, peak=True)
    growth = rss_end / rss_start - 1
    unexpected = {k: v for k, v in outcomes.items() if k not in expected}
    result: dict[str, Any] = {
        "requests": args.requests,
        "concurrency": args.concurrency,
        "elapsed_s": round(elapsed, 1),
        "requests_per_s": round(args.requests / elapsed, 1),
        "outcomes": dict(outcomes),
        "unexpected": unexpected,
        "rss_mb_after_warm_up": round(rss_start / 2**20, 1),
        "rss_mb_end": round(rss_end / 2**20, 1),
        "rss_growth": round(growth, 4),
        "rss_peak_mb": round(peak / 2**20, 1),
        "descriptors_after_warm_up": dict(fds_start),
        "descriptors_end": dict(fds_end),
    }
    ok = not unexpected and growth < 0.10 and fds_end["socket"] <= fds_start["socket"]
    ok = ok and sum(fds_end.values()) <= sum(fds_start.values())
    result["passed"] = ok
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode() + "\n")
    print(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
