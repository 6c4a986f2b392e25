"""Issue 3, point 8: when the client goes away, both upstream requests are closed at once.

The simulators count the aborts; the router counts the disconnect and holds nothing afterwards.
"""

from __future__ import annotations

import time

import httpx
import pytest

from tests.router.conftest import in_flight, metric, wait_idle
from tests.support import MODEL, di_stack, sim_stats, wait_until

PREFILL_MS, DECODE_STEP_MS = 1000, 50


@pytest.fixture(scope="module")
def slow():
    with di_stack(
        prefill_extra=["--sim-prefill-base-ms", str(PREFILL_MS)],
        decode_extra=["--sim-decode-base-ms", str(DECODE_STEP_MS)],
    ) as s:
        yield s


def body(stream: bool, max_tokens: int = 200) -> dict[str, object]:
    return {
        "model": MODEL,
        "prompt": "tell me a long story",
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": stream,
    }


def disconnects(stack) -> float:
    return metric(stack.router, "di_router_client_disconnects_total")


def counters(stack) -> dict[str, int]:
    p, d = sim_stats(stack.prefill), sim_stats(stack.decode)
    return {
        "prefill_aborted": p["aborted"],
        "decode_aborted": d["aborted"],
        "produced": p["kv"]["produced"],
        "pulled": p["kv"]["pulled"],
    }


@pytest.mark.parametrize("stream", [True, False])
def test_disconnect_during_prefill_aborts_both_legs(slow, stream):
    before, gone_before = counters(slow), disconnects(slow)
    start = time.monotonic()
    with pytest.raises(httpx.ReadTimeout):
        # Nothing is sent before prefill's first token: the client gives up after 0.2 s.
        httpx.post(slow.router.url + "/v1/completions", json=body(stream), timeout=0.2)
    # Both servers see the disconnect. A prefill abort only counts while the prefill is still
    # running (a finished sequence cannot be aborted), so this proves it was closed in time.
    wait_until(
        lambda: (
            counters(slow)["decode_aborted"] == before["decode_aborted"] + 1
            and counters(slow)["prefill_aborted"] == before["prefill_aborted"] + 1
        ),
        3,
        "both legs aborted",
    )
    assert time.monotonic() - start < 3
    wait_until(lambda: disconnects(slow) == gone_before + 1, 5, "disconnect counted")
    stats = wait_idle(slow.router, slow.prefill, slow.decode)
    after = counters(slow)
    assert after["produced"] == before["produced"]  # the aborted prefill left no KV entry
    assert stats[slow.prefill]["kv"]["pending"] == 0
    assert metric(slow.router, "di_router_requests_total", status="499") >= 1
    # A client going away is not a backend failure.
    assert metric(slow.router, "di_router_upstream_errors_total") == 0


def test_disconnect_mid_stream_aborts_decode(slow):
    before, gone_before = counters(slow), disconnects(slow)
    with httpx.stream(
        "POST", slow.router.url + "/v1/completions", json=body(True), timeout=10
    ) as response:
        assert response.status_code == 200
        raw = b""
        chunks = response.iter_raw()
        while raw.count(b"\n\n") < 2:
            raw += next(chunks)
        assert b"[DONE]" not in raw
    # Leaving the block closed the connection after two events.
    wait_until(
        lambda: counters(slow)["decode_aborted"] == before["decode_aborted"] + 1,
        2,
        "decode aborted",
    )
    wait_until(lambda: disconnects(slow) == gone_before + 1, 5, "disconnect counted")
    stats = wait_idle(slow.router, slow.prefill, slow.decode)
    after = counters(slow)
    # Prefill had finished and its KV was pulled: nothing to abort there, nothing pinned.
    assert after["prefill_aborted"] == before["prefill_aborted"]
    assert after["pulled"] == before["pulled"] + 1
    assert stats[slow.prefill]["kv"]["pending"] == 0
    assert in_flight(slow.router) == 0


def test_disconnect_while_waiting_for_unary_decode_aborts_decode(slow):
    before, gone_before = counters(slow), disconnects(slow)
    with pytest.raises(httpx.ReadTimeout):
        # Prefill takes 1 s, then 200 decode steps of 50 ms: give up in the middle.
        httpx.post(slow.router.url + "/v1/completions", json=body(False), timeout=1.5)
    wait_until(
        lambda: counters(slow)["decode_aborted"] == before["decode_aborted"] + 1,
        2,
        "decode aborted",
    )
    wait_until(lambda: disconnects(slow) == gone_before + 1, 5, "disconnect counted")
    wait_idle(slow.router, slow.prefill, slow.decode)
    after = counters(slow)
    assert after["prefill_aborted"] == before["prefill_aborted"]
    assert after["pulled"] == before["pulled"] + 1


def test_router_serves_normally_after_disconnects(slow):
    got = httpx.post(
        slow.router.url + "/v1/completions", json=body(False, max_tokens=3), timeout=10
    )
    assert got.status_code == 200
    assert got.json()["usage"]["completion_tokens"] == 3
    wait_idle(slow.router, slow.prefill, slow.decode)
