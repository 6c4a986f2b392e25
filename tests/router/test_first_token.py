"""Immediate first token: the client gets it when prefill has it, whatever decode is doing."""

from __future__ import annotations

import concurrent.futures
import subprocess
import time

import httpx
import orjson
import pytest

from tests.sse_strict import assemble, check_chunks, parse_sse
from tests.support import MODEL, di_stack, needs_curl, sim_stats, wait_until

PREFILL_S = 0.15
KV_TRANSFER_S = 2.0


@pytest.fixture(scope="module")
def slow_handoff():
    """Prefill takes 150 ms; the KV transfer to decode takes 2 s; decode has a single slot."""
    with di_stack(
        prefill_extra=["--sim-prefill-base-ms", str(PREFILL_S * 1000)],
        decode_extra=[
            "--sim-kv-setup-ms",
            str(KV_TRANSFER_S * 1000),
            "--sim-decode-base-ms",
            "10",
            "--max-num-seqs",
            "1",
        ],
    ) as s:
        yield s


def _token_times(url: str, body: dict) -> tuple[float, list[float], list[dict]]:
    """Send time and arrival times (one clock) of every token-bearing event, and the chunks."""
    times: list[float] = []
    raw = b""
    start = time.perf_counter()
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=30) as response:
        assert response.status_code == 200
        buffer = b""
        for piece in response.iter_raw():
            raw += piece
            buffer += piece
            while b"\n\n" in buffer:
                event, buffer = buffer.split(b"\n\n", 1)
                data = event.removeprefix(b"data: ")
                if data != b"[DONE]":
                    delta = orjson.loads(data)["choices"][0]["delta"]
                    if delta.get("content"):
                        times.append(time.perf_counter())
    chunks = parse_sse(raw)
    check_chunks(chunks, chat=True)
    return start, times, chunks


BODY = {
    "model": MODEL,
    "messages": [{"role": "user", "content": "hello"}],
    "max_tokens": 5,
    "temperature": 0,
    "stream": True,
}


def test_first_token_arrives_at_prefill_time_not_after_kv_transfer(slow_handoff):
    start, times, chunks = _token_times(slow_handoff.router.url, BODY)
    assert len(times) == 5
    assert times[0] - start < PREFILL_S + 0.6, times  # the first token does not wait for the KV
    assert times[1] - start >= KV_TRANSFER_S, times  # decode's tokens come after the transfer
    assert assemble(chunks, chat=True)["finish"] == {0: "length"}


def test_first_token_is_immediate_while_decode_batch_is_full(slow_handoff):
    """Request B's decode slot is taken by A, yet B's first token comes at prefill time."""
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        a = pool.submit(_token_times, slow_handoff.router.url, BODY)
        # B goes out once A holds the decode server's only slot.
        wait_until(lambda: sim_stats(slow_handoff.decode)["slots_in_use"] == 1, 10, "A's slot")
        b_start, b_times, _ = pool.submit(_token_times, slow_handoff.router.url, BODY).result()
        _, a_times, _ = a.result()
    assert b_times[0] - b_start < PREFILL_S * 2 + 0.6, b_times
    # B's decode could only start once A released the single slot (A's end + B's transfer).
    assert b_times[1] >= a_times[-1] + KV_TRANSFER_S - 0.1, (a_times, b_times)


def _curl(url: str, body: dict, *flags: str) -> subprocess.CompletedProcess[bytes]:
    """curl as the tutorial's examples run it."""
    argv = ["curl", *flags, url, "-H", "Content-Type: application/json"]
    argv += ["-d", orjson.dumps(body).decode()]
    return subprocess.run(argv, capture_output=True, timeout=30, check=True)


@needs_curl
def test_curl_streaming_as_in_the_tutorial(slow_handoff):
    body = {
        "model": MODEL,
        "prompt": ["a tornado is a"],
        "max_tokens": 10,
        "temperature": 0,
        "stream": True,
    }
    result = _curl(f"{slow_handoff.router.url}/v1/completions", body, "-sN")
    chunks = parse_sse(result.stdout)
    check_chunks(chunks, chat=False)
    got = assemble(chunks, chat=False)
    assert len(got["text"][0].split()) == 10 and got["finish"] == {0: "length"}


@needs_curl
def test_curl_non_streaming_as_in_the_tutorial(slow_handoff):
    body = {"model": MODEL, "prompt": ["a tornado is a"], "max_tokens": 10, "temperature": 0}
    result = _curl(f"{slow_handoff.router.url}/v1/completions", body, "-s", "-i")
    head, _, payload = result.stdout.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert b"content-type: application/json" in head.lower()
    reply = orjson.loads(payload)
    assert reply["object"] == "text_completion"
    assert len(reply["choices"][0]["text"].split()) == 10
    assert reply["usage"]["completion_tokens"] == 10
