"""Issue 8: many concurrent streams through one router all complete, exactly.

The full-size run (1,000 streams of 100 tokens 20 ms apart, against direct and a one-leg floor)
is in `benchmarks/`; here a scaled-down count proves the same property in CI: every stream ends
with `[DONE]`, carries exactly its tokens, no backend is marked down, and nothing is left held.
"""

from __future__ import annotations

import asyncio

import aiohttp

from tests.router.conftest import metric, wait_idle
from tests.sse_strict import check_chunks, parse_sse
from tests.support import MODEL, di_stack

STREAMS, TOKENS = 400, 30


async def _one(session: aiohttp.ClientSession, url: str, i: int) -> tuple[int, bytes]:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": f"stream number {i}"}],
        "max_tokens": TOKENS,
        "ignore_eos": True,
        "stream": True,
    }
    async with session.post(url + "/v1/chat/completions", json=body) as response:
        return response.status, await response.read()


async def _all(url: str) -> list[tuple[int, bytes]]:
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        return await asyncio.gather(*(_one(session, url, i) for i in range(STREAMS)))


def test_hundreds_of_concurrent_streams_all_complete():
    slots = ["--max-num-seqs", str(STREAMS)]
    # A 20 ms decode step, as on Trn2: every stream is open at once for the whole run.
    with di_stack(prefill_extra=slots, decode_extra=[*slots, "--sim-decode-base-ms", "20"]) as s:
        results = asyncio.run(_all(s.router.url))
        statuses = [status for status, _ in results]
        assert statuses == [200] * STREAMS, {x: statuses.count(x) for x in set(statuses)}
        for _, raw in results:
            chunks = parse_sse(raw)  # complete, well framed, exactly one [DONE]
            check_chunks(chunks, chat=True)
            tokens = sum(
                1 for c in chunks if c["choices"] and "content" in c["choices"][0]["delta"]
            )
            assert tokens == TOKENS + 1  # the role chunk's empty content, then one per token
        assert metric(s.router, "di_router_backend_up") == 2  # never marked down under load
        assert metric(s.router, "di_router_requests_total", status="200") == STREAMS
        wait_idle(s.router, s.prefill, s.decode)
