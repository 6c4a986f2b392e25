"""A lean closed-loop streaming client: enough to drive 1,000 streams from one process.

`di_router.bench.loadgen` parses every SSE event to compute llmperf's metrics; at 1,000 streams
of 50 events a second that costs more CPU than the proxy under test, so the client would be the
bottleneck. This one does a byte search per read instead: TTFT is the arrival of the first
`data: {` event, the stream must carry exactly `max_tokens` events and end with `data: [DONE]`,
and everything else counts as an error (the first message of each kind is kept).
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

from di_router.bench.loadgen import Stats

EVENT = b"data: {"
DONE = b"data: [DONE]"


@dataclass
class LoadResult:
    """One closed-loop run: counts, wall time and the TTFT sample of the successful requests."""

    concurrency: int
    ok: int = 0
    errors: int = 0
    elapsed_s: float = 0.0
    ttfts_s: list[float] = field(default_factory=list)
    error_kinds: Counter[str] = field(default_factory=Counter)

    @property
    def requests_per_s(self) -> float:
        return self.ok / self.elapsed_s if self.elapsed_s else 0.0

    def to_dict(self) -> dict[str, Any]:
        ttft = Stats.of(self.ttfts_s)
        return {
            "concurrency": self.concurrency,
            "ok": self.ok,
            "errors": self.errors,
            "elapsed_s": self.elapsed_s,
            "requests_per_s": self.requests_per_s,
            "ttft_p50_s": ttft.p50,
            "ttft_p99_s": ttft.p99,
            "error_kinds": dict(self.error_kinds.most_common(5)),
        }


def completion_body(max_tokens: int, model: str) -> bytes:
    """A streamed completion of exactly `max_tokens` tokens (EOS ignored)."""
    body = {
        "model": model,
        "prompt": "shall i compare thee to a summers day",
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "stream": True,
    }
    return orjson.dumps(body)


async def _one(
    session: aiohttp.ClientSession, url: str, body: bytes, tokens: int, result: LoadResult
) -> None:
    start = time.perf_counter()
    ttft: float | None = None
    events = 0
    tail = b""
    try:
        async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as r:
            if r.status != 200:
                await r.read()
                raise ValueError(f"HTTP {r.status}")
            async for chunk in r.content.iter_any():
                # The carried tail is shorter than EVENT, so no event is counted twice.
                events += (tail[-len(EVENT) + 1 :] + chunk).count(EVENT)
                tail = (tail + chunk)[-len(DONE) - 8 :]
                if ttft is None and events:
                    ttft = time.perf_counter() - start
        if DONE not in tail:
            raise ValueError("no [DONE] at the end")
        if events != tokens:
            raise ValueError(f"{events} events for {tokens} tokens")
    except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
        result.errors += 1
        result.error_kinds[f"{type(exc).__name__}: {str(exc)[:120]}"] += 1
        return
    assert ttft is not None
    result.ok += 1
    result.ttfts_s.append(ttft)


def client_session(concurrency: int, timeout_s: float = 120.0) -> aiohttp.ClientSession:
    """At most `concurrency` connections, kept alive from one run (the warm-up) to the next."""
    connector = aiohttp.TCPConnector(limit=concurrency, enable_cleanup_closed=False)
    return aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=timeout_s)
    )


async def closed_loop(
    session: aiohttp.ClientSession,
    url: str,
    body: bytes,
    tokens: int,
    concurrency: int,
    requests: int | None = None,
    duration_s: float | None = None,
) -> LoadResult:
    """`concurrency` workers, each sending its next request when its last one ended, until
    `requests` were sent or `duration_s` passed (requests under way then still finish)."""
    result = LoadResult(concurrency)
    sent = itertools.count(1)
    limit = requests if requests is not None else math.inf
    start = time.perf_counter()
    deadline = start + duration_s if duration_s is not None else math.inf

    async def worker() -> None:
        while next(sent) <= limit and time.perf_counter() < deadline:
            await _one(session, url, body, tokens, result)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    result.elapsed_s = time.perf_counter() - start
    return result
