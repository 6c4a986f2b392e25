"""The timing model, measured with the client's own clock over real streams.

Profile: instant + prefill 200 ms, decode step 50 ms, KV transfer setup 300 ms (decode only).
Tolerances are generous (+40 % or 30 ms) for a loaded 2-core CI box; lower bounds are tight
(30 ms) because a simulated step can only take longer than configured, never shorter.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import statistics
import threading
import time
from typing import Any

import pytest

from tests.sim.conftest import (
    CHAT,
    COMPLETIONS,
    chat_body,
    completion_body,
    metrics,
    paired,
    post,
    start_pair,
    timed_events,
)
from tests.sse_strict import assemble, check_chunks, parse_sse
from tests.support import running, start_sim

PREFILL_S, STEP_S, KV_SETUP_S = 0.2, 0.05, 0.3
TIMING = ["--sim-prefill-base-ms", "200", "--sim-decode-base-ms", "50"]


def assert_close(measured: float, expected: float, what: str) -> None:
    tolerance = max(0.4 * expected, 0.03)
    assert expected - 0.03 <= measured <= expected + tolerance, (
        f"{what}: {measured:.3f}s, expected {expected:.3f}s (-0.030s/+{tolerance:.3f}s)"
    )


@pytest.fixture(scope="module")
def servers():
    pair = start_pair(prefill_extra=TIMING, decode_extra=[*TIMING, "--sim-kv-setup-ms", "300"])
    baseline = start_sim("baseline", extra=TIMING, name="timed-baseline")
    with running(baseline, *pair) as procs:
        yield procs


@pytest.mark.parametrize("path", [COMPLETIONS, CHAT])
def test_ttft_and_step_time_match_the_profile(servers, path):
    baseline = servers[0]
    chat = path == CHAT
    body = chat_body("time me", 10) if chat else completion_body("time me", 10)
    before = metrics(baseline)
    sent, arrivals, raw = timed_events(baseline, path, body)
    chunks = parse_sse(raw)
    check_chunks(chunks, chat)
    assert assemble(chunks, chat)["finish"] == {0: "length"}
    tokens = arrivals[1:-1] if chat else arrivals[:-1]  # drop the role chunk / the [DONE]
    assert len(tokens) == 10
    assert_close(tokens[0] - sent, PREFILL_S, "TTFT")
    gaps = [b - a for a, b in itertools.pairwise(tokens)]
    assert_close(statistics.median(gaps), STEP_S, "median inter-token gap")
    assert_close(tokens[-1] - tokens[0], 9 * STEP_S, "9 decode steps")
    # The server's own histogram saw the same TTFT.
    after = metrics(baseline)
    ttft = (
        after["vllm:time_to_first_token_seconds_sum"]
        - before["vllm:time_to_first_token_seconds_sum"]
    )
    assert_close(ttft, PREFILL_S, "vllm:time_to_first_token_seconds")


def _max_gap_while_another_request_runs(target, interferer) -> tuple[float, Any]:
    """Stream 24 tokens from `target`; after its 3rd token, send `interferer()` from a thread.

    Returns the largest inter-token gap of the stream and the interfering request's result,
    after checking that the interferer finished while the stream was still running.
    """
    done: list[tuple[Any, float]] = []
    threads: list[threading.Thread] = []

    def run() -> None:
        result = interferer()
        done.append((result, time.monotonic()))

    def on_event(n: int) -> None:
        if n == 3:
            threads.append(threading.Thread(target=run))
            threads[0].start()

    _, arrivals, raw = target(on_event)
    for thread in threads:
        thread.join(30)
    assert assemble(parse_sse(raw), chat=False)["finish"] == {0: "length"}
    [(result, finished_at)] = done
    tokens = arrivals[:-1]  # drop [DONE]
    assert finished_at < tokens[-1], "the other request did not overlap the stream"
    return max(b - a for a, b in itertools.pairwise(tokens)), result


def test_baseline_stream_stalls_during_another_prefill(servers):
    """The interference DI removes: a baseline prefill stops every running sequence."""
    baseline = servers[0]
    body = completion_body("victim", 24)
    max_gap, other = _max_gap_while_another_request_runs(
        lambda on_event: timed_events(baseline, COMPLETIONS, body, on_event=on_event),
        lambda: post(baseline, COMPLETIONS, completion_body("intruder", 2)),
    )
    assert other.status_code == 200
    assert max_gap >= PREFILL_S - 0.03, f"no stall: max gap {max_gap:.3f}s"


def test_decode_stream_does_not_stall_during_another_prefill(servers):
    """On a DI pair the other request's prefill (and KV transfer) leaves decode steps alone."""
    _, prefill, decode = servers
    body = completion_body("victim", 24)
    intruder = completion_body("intruder", 2)

    def victim(on_event):
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            p = pool.submit(post, prefill, COMPLETIONS, {**body, "max_tokens": 1}, "victim")
            timed = timed_events(decode, COMPLETIONS, body, rid="victim", on_event=on_event)
            assert p.result().status_code == 200
        return timed

    max_gap, (p, d) = _max_gap_while_another_request_runs(
        victim, lambda: paired(prefill, decode, COMPLETIONS, intruder, "intruder")
    )
    assert p.status_code == 200 and d.status_code == 200
    # A stall would last the other prefill (0.2 s) or its KV transfer (0.3 s).
    assert max_gap < PREFILL_S - 0.03, f"decode stalled: max gap {max_gap:.3f}s"


def test_kv_transfer_delays_the_decode_first_token(servers):
    _, prefill, decode = servers
    body = completion_body("transfer me", 3)
    # Prefill first, so the consumer's pull succeeds at once: what remains is the transfer.
    assert post(prefill, COMPLETIONS, {**body, "max_tokens": 1}, "kv-delay").status_code == 200
    sent, arrivals, _ = timed_events(decode, COMPLETIONS, body, rid="kv-delay")
    assert_close(arrivals[0] - sent, KV_SETUP_S, "decode TTFT = KV transfer")
    assert_close(arrivals[2] - arrivals[0], 2 * STEP_S, "2 decode steps after the transfer")
