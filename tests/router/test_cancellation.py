"""When the client goes away, the router ends its side at once and the servers get their slots
back without ever being left with one nobody can free (issue 9).

On Neuron's servers a decode request waiting for KV cannot be aborted and a finished prefill
pins its KV until pulled, so: prefill is never cancelled before its first token, and decode is
closed (and so aborted) only once it has emitted, i.e. is past `transferring`. The simulators
count the aborts; the router counts the disconnect at once and holds nothing afterwards.
"""

from __future__ import annotations

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
def test_disconnect_during_prefill_lets_the_pair_finish(slow, stream):
    before, gone_before = counters(slow), disconnects(slow)
    with pytest.raises(httpx.ReadTimeout):
        # Nothing is sent before prefill's first token: the client gives up after 0.2 s.
        httpx.post(
            slow.router.url + "/v1/completions", json=body(stream, max_tokens=20), timeout=0.2
        )
    # The router counts the disconnect at once, not when the legs are settled.
    wait_until(lambda: disconnects(slow) == gone_before + 1, 0.8, "disconnect counted")
    # Prefill ran to its token (never cancelled), decode pulled the KV: nothing is pinned.
    wait_until(lambda: counters(slow)["pulled"] == before["pulled"] + 1, 5, "decode pulled the KV")
    stats = wait_idle(slow.router, slow.prefill, slow.decode, timeout=10)
    after = counters(slow)
    assert after["prefill_aborted"] == before["prefill_aborted"]
    assert after["produced"] == before["produced"] + 1
    assert stats[slow.prefill]["kv"]["pending"] == 0
    if stream:  # closed once past `transferring`: the abort finds it running
        assert after["decode_aborted"] == before["decode_aborted"] + 1
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


def test_disconnect_while_waiting_for_unary_decode_lets_decode_finish(slow):
    """A non-streamed decode sends nothing before its whole answer, so the router cannot tell
    whether an abort would find it (it may still be waiting for KV, or queued with prefill's
    entry pinned for it): it lets the request finish, then returns the connection."""
    before, gone_before = counters(slow), disconnects(slow)
    with pytest.raises(httpx.ReadTimeout):
        # Prefill takes 1 s, then 30 decode steps of 50 ms: give up in the middle.
        httpx.post(slow.router.url + "/v1/completions", json=body(False, 30), timeout=1.5)
    wait_until(lambda: disconnects(slow) == gone_before + 1, 0.8, "disconnect counted")
    wait_idle(slow.router, slow.prefill, slow.decode, timeout=10)
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
