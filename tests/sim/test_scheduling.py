"""Slot accounting under concurrency, aborts on client disconnect, 1,000 concurrent streams."""

from __future__ import annotations

import asyncio
import concurrent.futures
import time

import httpx
import pytest

from tests.sim.conftest import (
    CHAT,
    COMPLETIONS,
    chat_body,
    completion_body,
    metrics,
    open_then_close,
    post,
    start_pair,
)
from tests.sse_strict import assemble, check_chunks, parse_sse
from tests.support import MODEL, running, sim_stats, start_sim, wait_until


# -- slots ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def two_slots():
    extra = ["--max-num-seqs", "2", "--sim-prefill-base-ms", "50", "--sim-decode-base-ms", "20"]
    with running(start_sim("baseline", extra=extra, name="two-slots")) as (proc,):
        yield proc


def _max_overlap(intervals: list[tuple[float, float]]) -> int:
    edges = sorted([(a, 1) for a, _ in intervals] + [(b, -1) for _, b in intervals])
    level = peak = 0
    for _, step in edges:
        level += step
        peak = max(peak, level)
    return peak


def test_never_more_running_than_max_num_seqs(two_slots):
    def one(i: int) -> tuple[float, float, dict]:
        stamps: list[float] = []
        raw = b""
        with httpx.stream(
            "POST", two_slots.url + COMPLETIONS, timeout=30,
            json={**completion_body(f"slot {i}", 8), "stream": True},
        ) as resp:  # fmt: skip
            for data in resp.iter_raw():
                raw += data
                stamps.append(time.monotonic())
        chunks = parse_sse(raw)
        check_chunks(chunks, chat=False)
        return stamps[0], stamps[-1], assemble(chunks, chat=False)

    seen: list[tuple[float, float, float]] = []
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(one, i) for i in range(6)]
        while not all(f.done() for f in futures):
            m, stats = metrics(two_slots), sim_stats(two_slots)
            seen.append(
                (
                    m["vllm:num_requests_running"],
                    m["vllm:num_requests_waiting"],
                    stats["slots_in_use"],
                )
            )
        results = [f.result() for f in futures]
    assert max(r for r, _, _ in seen) == 2 and max(s for _, _, s in seen) == 2
    assert max(w for _, w, _ in seen) >= 2  # the others queued
    assert all(r["finish"] == {0: "length"} for *_, r in results)
    assert all(len(r["text"][0].split()) == 8 for *_, r in results)
    # Client side: the first-to-last token windows of the 6 streams never overlap 3 deep.
    assert _max_overlap([(a, b) for a, b, _ in results]) == 2
    assert sim_stats(two_slots)["slots_in_use"] == 0


# -- aborts --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def slow():
    extra = ["--sim-prefill-base-ms", "300", "--sim-decode-base-ms", "100"]
    with running(start_sim("baseline", extra=extra, name="slow")) as (proc,):
        yield proc


def _wait_aborted(proc, before: int) -> dict:
    return wait_until(
        lambda: (s := sim_stats(proc))["aborted"] == before + 1 and s["slots_in_use"] == 0 and s,
        5,
        f"{proc.name}: one abort and every slot free",
    )


@pytest.mark.parametrize("path", [COMPLETIONS, CHAT])
def test_disconnect_mid_decode_aborts_and_frees_the_slot(slow, path):
    before = sim_stats(slow)["aborted"]
    body = chat_body("long", 200) if path == CHAT else completion_body("long", 200)
    raw = open_then_close(slow, path, body, events=1)
    assert raw.count(b"\n\n") == 1 and b"[DONE]" not in raw
    stats = _wait_aborted(slow, before)
    assert stats["running"] == 0 and stats["waiting"] == 0
    assert metrics(slow)["di_sim:requests_aborted_total"] == before + 1


def test_disconnect_during_prefill_frees_the_slot(slow):
    before = sim_stats(slow)["aborted"]
    open_then_close(slow, COMPLETIONS, completion_body("abort in prefill", 50), events=0)
    _wait_aborted(slow, before)


def test_disconnect_of_non_streaming_request_aborts(slow):
    before = sim_stats(slow)["aborted"]
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(slow.url + COMPLETIONS, json=completion_body("impatient", 200), timeout=0.6)
    _wait_aborted(slow, before)


def test_abort_transferring_flag_frees_a_consumer_slot_waiting_for_kv():
    """`--sim-abort-transferring` departs from vLLM (test_neuron_semantics pins the default)."""
    prefill, decode = start_pair(decode_extra=["--sim-abort-transferring"])
    with running(prefill, decode):
        open_then_close(decode, COMPLETIONS, completion_body("never prefilled", 8), 0, "gone")
        stats = _wait_aborted(decode, 0)
        assert stats["transferring"] == 0 and stats["aborts_ignored"] == 0
        # The consumer's pending lookup was cancelled: a later prefill entry for it stays.
        post(prefill, COMPLETIONS, completion_body("never prefilled", 1), "gone")
        assert sim_stats(prefill)["kv"] == {"produced": 1, "pulled": 0, "expired": 0, "pending": 1}


# -- load ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def big():
    with running(start_sim("baseline", extra=["--max-num-seqs", "1024"], name="big")) as (proc,):
        yield proc


def test_one_thousand_concurrent_streams(big):
    """One instant simulator serves 1,000 concurrent streams, each ending in a correct [DONE].

    The streams are spread over 20 clients of 50 connections: one httpcore pool of 1,000
    connections spends O(n^2) CPU choosing connections and would measure the client, not us.
    """
    n, clients_n = 1000, 20
    open_now = peak = 0

    async def one(client: httpx.AsyncClient, i: int) -> dict:
        nonlocal open_now, peak
        chat = i % 2 == 1
        body = chat_body(f"load {i}", 4) if chat else completion_body(f"load {i}", 4)
        path = CHAT if chat else COMPLETIONS
        async with client.stream("POST", big.url + path, json={**body, "stream": True}) as resp:
            assert resp.status_code == 200
            open_now += 1
            peak = max(peak, open_now)
            raw = await resp.aread()
            open_now -= 1
        chunks = parse_sse(raw)
        check_chunks(chunks, chat)
        result = assemble(chunks, chat)
        if chat:  # a role chunk on every stream, before the first token
            assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        assert result["finish"] == {0: "length"} and len(result["text"][0].split()) == 4
        return result

    async def main() -> list:
        limits = httpx.Limits(max_connections=n // clients_n + 5)
        clients = [httpx.AsyncClient(limits=limits, timeout=60) for _ in range(clients_n)]
        try:
            return await asyncio.gather(*(one(clients[i % clients_n], i) for i in range(n)))
        finally:
            await asyncio.gather(*(c.aclose() for c in clients))

    started = time.monotonic()
    results = asyncio.run(main())
    assert len(results) == n
    assert time.monotonic() - started < 25
    assert peak >= 250, f"only {peak} streams were ever open at once"
    stats = sim_stats(big)
    assert stats["slots_in_use"] == 0 and stats["aborted"] == 0
    assert metrics(big)["vllm:request_success_total"] == n
    assert post(big, COMPLETIONS, {"model": MODEL, "prompt": "still alive", "max_tokens": 2}).json()
