"""Issue 10: overload turns clients away at once with a 429, and SIGTERM (finding 7) lets the
streams in flight finish, or ends them properly, then exits 0 without a traceback.

Before the rewrite (d4390a2) there was no admission limit, and SIGTERM closed the listener,
cut the streams 3 s later with status 200, no error event and no `[DONE]`, with asyncio
tracebacks in the log.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from tests.router.conftest import is_openai_error, metric, wait_idle
from tests.sse_strict import assemble, check_chunks, parse_sse
from tests.support import MODEL, DIStack, Proc, di_stack, running, start_router

STEP_MS = 50
LIMIT, QUEUE, CLIENTS = 8, 4, 32


@pytest.fixture(scope="module")
def sims() -> Iterator[DIStack]:
    """Decode steps of 50 ms keep requests in flight long enough to overload or interrupt."""
    with di_stack(decode_extra=["--sim-decode-base-ms", str(STEP_MS)]) as s:
        yield s


def router(sims: DIStack, *flags: str) -> Proc:
    return start_router(sims.prefill, sims.decode, ["--health-interval", "0.2", *flags])


def completion(max_tokens: int) -> dict[str, object]:
    return {"model": MODEL, "prompt": "hello", "max_tokens": max_tokens, "stream": True}


@dataclass
class Outcome:
    status: int
    elapsed: float
    body: bytes
    retry_after: str | None
    error: BaseException | None = None


async def _one(client: httpx.AsyncClient, url: str, max_tokens: int) -> Outcome:
    start = time.monotonic()
    try:
        async with client.stream("POST", url + "/v1/completions", json=completion(max_tokens)) as r:
            body = b"".join([part async for part in r.aiter_raw()])
            return Outcome(
                r.status_code, time.monotonic() - start, body, r.headers.get("retry-after")
            )
    except httpx.HTTPError as exc:
        return Outcome(0, time.monotonic() - start, b"", None, exc)


async def _many(url: str, clients: int, max_tokens: int) -> list[Outcome]:
    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(timeout=30, limits=limits) as client:
        return list(await asyncio.gather(*(_one(client, url, max_tokens) for _ in range(clients))))


# -- overload -----------------------------------------------------------------------------------


def test_clients_beyond_the_limit_and_queue_get_a_fast_429(sims: DIStack) -> None:
    """4x more clients than --max-concurrent-requests: 8 run, 4 wait for a place, the rest get
    a 429 with Retry-After at once, while the admitted ones complete exactly."""
    gate = router(sims, "--max-concurrent-requests", str(LIMIT),
                  "--max-queued-requests", str(QUEUE))  # fmt: skip
    with running(gate):
        gate.wait_ready("/ready", timeout=15)
        outcomes = asyncio.run(_many(gate.url, CLIENTS, 40))  # 2 s each
        served = [o for o in outcomes if o.status == 200]
        turned_away = [o for o in outcomes if o.status == 429]
        assert len(served) + len(turned_away) == CLIENTS, [(o.status, o.error) for o in outcomes]
        assert LIMIT + QUEUE <= len(served) < CLIENTS // 2, len(served)
        for o in served:
            chunks = parse_sse(o.body)
            check_chunks(chunks, chat=False)
            assert assemble(chunks, chat=False)["finish"] == {0: "length"}
        for o in turned_away:
            error = is_openai_error(httpx.Response(429, content=o.body, headers={
                "content-type": "application/json"}), 429)  # fmt: skip
            assert error["type"] == "RateLimitError"
            assert o.retry_after is not None and int(o.retry_after) >= 1
        slowest_429 = max(o.elapsed for o in turned_away)
        assert slowest_429 < min(o.elapsed for o in served), "a 429 waited for a place"
        assert slowest_429 < 1.0, f"a 429 took {slowest_429:.2f}s"
        assert metric(gate, "di_router_requests_rejected_total", reason="overload") == len(
            turned_away
        )
        wait_idle(gate, *sims.sims)


# -- shutdown -----------------------------------------------------------------------------------


async def _sigterm_during_streams(
    proc: Proc, clients: int, max_tokens: int, signals: int
) -> tuple[list[Outcome], int | None]:
    """Start `clients` streams, SIGTERM the router once each has its first event (`signals`
    times: a second one ends the drain), and read them to their end; also probe /ready during
    the drain (None: connection refused)."""
    limits = httpx.Limits(max_connections=clients)
    started = asyncio.Event()
    first_events = 0

    async def stream(client: httpx.AsyncClient) -> Outcome:
        nonlocal first_events
        start = time.monotonic()
        async with client.stream(
            "POST", proc.url + "/v1/completions", json=completion(max_tokens)
        ) as r:
            body = b""
            async for part in r.aiter_raw():
                if not body:
                    first_events += 1
                    if first_events == clients:
                        started.set()
                body += part
            return Outcome(r.status_code, time.monotonic() - start, body, None)

    async with httpx.AsyncClient(timeout=30, limits=limits) as client:
        tasks = [asyncio.ensure_future(stream(client)) for _ in range(clients)]
        await asyncio.wait_for(started.wait(), 15)
        os.kill(proc.pid, signal.SIGTERM)
        try:
            async with httpx.AsyncClient(timeout=2) as probe:
                ready: int | None = (await probe.get(proc.url + "/ready")).status_code
        except httpx.ConnectError:
            ready = None
        for _ in range(signals - 1):
            os.kill(proc.pid, signal.SIGTERM)
        return list(await asyncio.gather(*tasks)), ready


@pytest.mark.parametrize(
    ("drain", "max_tokens", "signals", "finished"),
    [
        pytest.param(10, 30, 1, True, id="all-finish-within-the-drain"),
        pytest.param(0.5, 400, 1, False, id="drain-runs-out"),
        pytest.param(30, 400, 2, False, id="a-second-signal-ends-them-at-once"),
    ],
)
def test_sigterm_during_streams(
    sims: DIStack, drain: float, max_tokens: int, signals: int, finished: bool
) -> None:
    """20 streams mid-way when SIGTERM comes: with time enough they all finish; otherwise
    each ends with an error event and `[DONE]` when the drain timeout runs out, or at once on
    a second signal (Ctrl-C again). Either way the router exits 0 with no traceback, and
    /ready is 503 (or refused) meanwhile."""
    proc = router(sims, "--drain-timeout", str(drain))
    with running(proc):
        proc.wait_ready("/ready", timeout=15)
        signalled = time.monotonic()
        outcomes, ready = asyncio.run(_sigterm_during_streams(proc, 20, max_tokens, signals))
        assert proc.popen.wait(drain + 10) == 0, proc.log_tail()
        took = time.monotonic() - signalled
    assert ready in (503, None), ready
    for o in outcomes:
        assert o.status == 200
        chunks = parse_sse(o.body)  # complete: exactly one [DONE] at the end
        if finished:
            check_chunks(chunks, chat=False)
            assert assemble(chunks, chat=False)["finish"] == {0: "length"}
            assert len(chunks) == max_tokens  # one token per chunk
        else:
            error = chunks[-1]["error"]
            assert error["code"] == 503 and "shutting down" in error["message"], error
            assert all("error" not in c for c in chunks[:-1])
    if not finished:
        bound = 5 if signals > 1 else drain + 5
        assert took < bound, f"the drain took {took:.1f}s"
    log = proc.log()
    assert "Traceback" not in log and "Task exception" not in log, log[-3000:]
    wait_idle(sims.router, *sims.sims, timeout=15)  # the servers got every slot back
