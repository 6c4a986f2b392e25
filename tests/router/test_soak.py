"""A bounded soak: rounds of mixed traffic (streams, unary, disconnects, bad input, refusals)
leave the router with no request in flight, no KV entry pinned and no file descriptor leaked."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random

import httpx
import pytest

from tests.router.conftest import wait_idle
from tests.support import MODEL, di_stack, sim_stats, wait_until

ROUNDS, PER_ROUND, CONCURRENCY = 3, 150, 12
SOCKETS = 1 + 2 * (CONCURRENCY + 2)


def _fds(pid: int) -> tuple[int, int]:
    """(sockets, other descriptors) the process holds."""
    links = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(FileNotFoundError):
            links.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
    sockets = sum(link.startswith("socket:") for link in links)
    return sockets, len(links) - sockets


def _client_sockets(port: int) -> int:
    """Connections the router still holds on its port (CLOSE-WAIT included)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError), open(table) as lines:
            for line in list(lines)[1:]:
                local, state = line.split()[1], line.split()[3]
                # Not the listener (0A), nor TIME_WAIT (06): the kernel's, no descriptor left.
                if int(local.rsplit(":", 1)[1], 16) == port and state not in ("0A", "06"):
                    count += 1
    return count


async def _one(client: httpx.AsyncClient, url: str, rng: random.Random) -> None:
    kind = rng.choice(["stream", "unary", "disconnect", "bad_json", "refused", "chat"])
    prompt = "a tornado is a"
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 8, "temperature": 0}
    if kind == "bad_json":
        got = await client.post(url + "/v1/completions", content=b"{not json")
        assert got.status_code == 400
    elif kind == "refused":  # decode's context is smaller: only decode refuses
        got = await client.post(url + "/v1/completions", json={**body, "max_tokens": 60})
        assert got.status_code == 400
    elif kind == "unary":
        got = await client.post(url + "/v1/completions", json=body)
        assert got.status_code == 200
    else:
        path = "/v1/chat/completions" if kind == "chat" else "/v1/completions"
        if kind == "chat":
            body = {
                "model": MODEL,
                "messages": [{"role": "user", "content": prompt}],
                "max_tokens": 8,
                "temperature": 0,
            }
        async with client.stream("POST", url + path, json={**body, "stream": True}) as response:
            assert response.status_code == 200
            async for chunk in response.aiter_raw():
                if kind == "disconnect" and chunk:
                    break  # leaving the block closes the connection mid-stream


async def _round(url: str, seed: int) -> None:
    rng = random.Random(seed)
    limits = httpx.Limits(max_connections=CONCURRENCY)
    async with httpx.AsyncClient(timeout=30, limits=limits) as client:
        semaphore = asyncio.Semaphore(CONCURRENCY)

        async def bounded() -> None:
            async with semaphore:
                await _one(client, url, rng)

        await asyncio.gather(*(bounded() for _ in range(PER_ROUND)))


@pytest.mark.timeout(240)
def test_rounds_of_mixed_traffic_leak_nothing():
    with di_stack(
        prefill_extra=["--max-model-len", "64"],
        decode_extra=["--max-model-len", "40", "--sim-decode-base-ms", "2"],
    ) as s:
        pid = s.router.popen.pid
        port = int(s.router.url.rsplit(":", 1)[1])
        others = []
        for round_no in range(ROUNDS):
            asyncio.run(_round(s.router.url, round_no))
            stats = wait_idle(s.router, *s.sims, timeout=20)
            kv = stats[s.prefill]["kv"]
            assert kv["produced"] == kv["pulled"] and kv["pending"] == 0, kv
            # Every client connection is gone within the keep-alive timeout (5 s) ...
            wait_until(lambda: _client_sockets(port) == 0, 10, "client connections closed")
            # ... the rest are the listener and pooled backend connections (at most one per
            # concurrent request and backend, plus the health checks' and KV releases'; the
            # background settling's extra ones close after the pool's 4 s keep-alive) ...
            wait_until(lambda: _fds(pid)[0] <= SOCKETS, 10, f"sockets within {SOCKETS}")
            _, other = _fds(pid)
            others.append(other)
        # ... and no other descriptor accumulates from round to round.
        assert max(others) - min(others) <= 1, others
        assert sim_stats(s.decode)["aborted"] > 0  # the disconnects really happened
