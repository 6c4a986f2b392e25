"""Neuron DI protocol: producer + consumer with one X-Request-Id reproduce the baseline exactly.

Covers engine ids (`cmpl-<hdr>-<i>`, `chatcmpl-<hdr>`), the pulled first token, slots pinned
until pulled, consumer slots reserved on arrival, the `--sim-kv-timeout` departure, entry TTL
expiry and the counters in /metrics and /sim/stats. test_neuron_semantics pins the failure modes.
"""

from __future__ import annotations

import concurrent.futures
import time

import pytest

from tests.sim.conftest import (
    CHAT,
    COMPLETIONS,
    chat_body,
    completion_body,
    kv_config,
    metrics,
    paired,
    post,
    sim_proc,
    start_pair,
    stream,
    texts,
)
from tests.sse_strict import parse_sse
from tests.support import free_port, running, sim_stats, wait_until

PROMPTS = ["a tornado is a", "the sky", "once upon a time there was"]


def _kv(proc) -> dict[str, int]:
    return sim_stats(proc)["kv"]


def test_completions_list_pair_matches_baseline(trio):
    baseline, prefill, decode = trio
    body = completion_body(PROMPTS, 12)
    expected = post(baseline, COMPLETIONS, body).json()
    before = _kv(prefill)
    p, d = paired(prefill, decode, COMPLETIONS, body, "pair-cmpl")
    assert p.status_code == 200 and d.status_code == 200, (p.text, d.text)
    got = d.json()
    assert got["id"] == "cmpl-pair-cmpl" and p.json()["id"] == "cmpl-pair-cmpl"
    assert texts(d) == texts(post(baseline, COMPLETIONS, body))
    assert got["usage"] == expected["usage"]
    # The prefill's single token is the baseline's first token of every prompt.
    assert texts(p) == [" " + t.split()[0] for t in texts(d)]
    after = _kv(prefill)
    assert after["produced"] == before["produced"] + 3
    assert after["pulled"] == before["pulled"] + 3
    assert after["pending"] == before["pending"]


def test_completions_list_pair_streaming(trio):
    baseline, prefill, decode = trio
    body = completion_body(PROMPTS, 8)
    expected = texts(post(baseline, COMPLETIONS, body))
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        p = pool.submit(post, prefill, COMPLETIONS, {**body, "max_tokens": 1}, "pair-s")
        chunks, result = stream(decode, COMPLETIONS, body, rid="pair-s")
        assert p.result().status_code == 200
    assert [result["text"][i] for i in range(3)] == expected
    assert result["finish"] == {0: "length", 1: "length", 2: "length"}
    assert len(chunks) == 3 * 8 and chunks[0]["id"] == "cmpl-pair-s"


@pytest.mark.parametrize("streaming", [False, True])
def test_chat_pair_matches_baseline(trio, streaming):
    baseline, prefill, decode = trio
    body = chat_body("tell me a story", 10)
    expected = texts(post(baseline, CHAT, body))[0]
    rid = f"pair-chat-{streaming}"
    if streaming:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            p = pool.submit(post, prefill, CHAT, {**body, "max_tokens": 1}, rid)
            chunks, result = stream(decode, CHAT, body, rid=rid)
            assert p.result().status_code == 200
        assert chunks[0]["id"] == f"chatcmpl-{rid}"
        assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        got = result["text"][0]
    else:
        p, d = paired(prefill, decode, CHAT, body, rid)
        assert p.status_code == 200 and d.json()["id"] == f"chatcmpl-{rid}"
        assert d.json()["usage"] == post(baseline, CHAT, body).json()["usage"]
        got = texts(d)[0]
    assert got == expected
    assert texts(p.result() if streaming else p)[0] == " " + expected.split()[0]


def test_decode_emits_the_pulled_token_not_its_own(trio):
    """Unseeded sampling: prefill and decode draw differently, yet decode starts with P's token."""
    _, prefill, decode = trio
    for i in range(3):
        body = {**completion_body("random start", 4), "temperature": 1.0}
        p, d = paired(prefill, decode, COMPLETIONS, body, f"pulled-{i}")
        assert texts(d)[0].split()[0] == texts(p)[0].strip()


def test_seeded_pair_matches_seeded_baseline(trio):
    baseline, prefill, decode = trio
    body = completion_body("seeded story", 10, temperature=0.9, seed=11)
    _, d = paired(prefill, decode, COMPLETIONS, body, "pair-seed")
    assert texts(d) == texts(post(baseline, COMPLETIONS, body))


@pytest.fixture(scope="module")
def kind_pair():
    """A decode server with `--sim-kv-timeout 1`, which departs from vLLM's wait forever."""
    prefill, decode = start_pair(decode_extra=["--sim-kv-timeout", "1"])
    with running(prefill, decode):
        yield prefill, decode


def test_kv_timeout_flag_fails_mismatched_ids_and_the_producer_slot_stays_pinned(kind_pair):
    prefill, decode = kind_pair
    before = sim_stats(prefill)
    timeouts_before = metrics(decode)["di_sim:kv_pull_timeouts_total"]
    c_body, h_body = completion_body("hello there", 4), chat_body("hello there", 4)
    assert post(prefill, COMPLETIONS, {**c_body, "max_tokens": 1}, "left").status_code == 200
    assert post(prefill, CHAT, {**h_body, "max_tokens": 1}, "left-chat").status_code == 200
    started = time.monotonic()
    aborted_before = sim_stats(decode)["aborted"]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        d_cmpl = pool.submit(post, decode, COMPLETIONS, c_body, "right")
        d_chat = pool.submit(post, decode, CHAT, h_body, "right-chat")
        d_stream = pool.submit(
            post, decode, COMPLETIONS, {**c_body, "stream": True}, "right-stream"
        )
        d_list = pool.submit(post, decode, COMPLETIONS, completion_body(PROMPTS, 4), "right-list")
        cmpl, chat, streamed = d_cmpl.result(), d_chat.result(), d_stream.result()
        assert d_list.result().status_code == 500
    assert time.monotonic() - started >= 0.95  # failed only after the timeout
    assert cmpl.status_code == 500 and cmpl.json()["object"] == "error"
    assert "'cmpl-right-0'" in cmpl.json()["message"]
    assert chat.status_code == 500 and "'chatcmpl-right-chat'" in chat.json()["message"]
    # A stream already answered 200: the failure is one error event, then [DONE].
    assert streamed.status_code == 200
    [event] = parse_sse(streamed.content)
    assert event["error"]["code"] == 400 and "cmpl-right-stream-0" in event["error"]["message"]

    held = sim_stats(prefill)
    assert held["slots_in_use"] == before["slots_in_use"] + 2
    assert held["kv"]["pending"] == before["kv"]["pending"] + 2
    decode_stats = sim_stats(decode)
    assert decode_stats["slots_in_use"] == 0
    # Failed requests are not client aborts (the list's other prompts stop with the first).
    assert decode_stats["aborted"] == aborted_before
    timeouts = metrics(decode)["di_sim:kv_pull_timeouts_total"] - timeouts_before
    assert 4 <= timeouts <= 6 and decode_stats["kv_pull_timeouts"] >= 4

    # The pinned slots are freed by a consumer that finally asks for the right ids.
    assert post(decode, COMPLETIONS, c_body, "left").status_code == 200
    assert post(decode, CHAT, h_body, "left-chat").status_code == 200
    wait_until(
        lambda: sim_stats(prefill)["slots_in_use"] == before["slots_in_use"],
        5,
        "prefill slots released after the pull",
    )
    assert _kv(prefill)["pending"] == before["kv"]["pending"]


def test_kv_counters_in_metrics_match_stats(trio):
    _, prefill, decode = trio
    paired(prefill, decode, COMPLETIONS, completion_body("count", 3), "counted")
    m, kv = metrics(prefill), _kv(prefill)
    assert m["di_sim:kv_entries_produced_total"] == kv["produced"] > 0
    assert m["di_sim:kv_entries_pulled_total"] == kv["pulled"] > 0
    assert m["di_sim:kv_entries_expired_total"] == kv["expired"]
    assert m["di_sim:kv_entries_pending"] == kv["pending"]
    assert m["di_sim:requests_aborted_total"] == sim_stats(prefill)["aborted"]
    assert "di_sim:kv_entries_produced_total" not in metrics(decode)  # producer-only


# -- TTL expiry (and the core-offset warning of a producer on the wrong cores) -------------------
@pytest.fixture(scope="module")
def ttl_prefill():
    kv_port = free_port()
    consumer_kv = kv_config("kv_consumer", kv_port)
    proc = sim_proc(
        "ttl-prefill",
        [
            "--host", "127.0.0.1", "--sim-profile", "instant", "--sim-kv-entry-ttl", "0.3",
            "--kv-transfer-config", kv_config("kv_producer", kv_port),
        ],
        env={"NEURON_RT_VISIBLE_CORES": "32-63"},
    )  # fmt: skip
    consumer = sim_proc("ttl-decode", ["--host", "127.0.0.1", "--kv-transfer-config", consumer_kv])
    with running(proc, consumer):
        yield proc


def test_unpulled_entry_expires_after_ttl(ttl_prefill):
    assert (
        post(ttl_prefill, COMPLETIONS, completion_body(["a", "b"], 1), "nobody").status_code == 200
    )
    stats = wait_until(
        lambda: (s := sim_stats(ttl_prefill))["kv"]["expired"] == 2 and s, 5, "2 entries expired"
    )
    assert stats["slots_in_use"] == 0 and stats["kv"]["pending"] == 0
    assert stats["kv"]["pulled"] == 0 and stats["kv"]["produced"] == 2
    assert metrics(ttl_prefill)["di_sim:kv_entries_expired_total"] == 2


def test_core_offset_mismatch_is_warned_about(ttl_prefill):
    log = ttl_prefill.log()
    assert "WARNING" in log
    assert "neuron_core_offset=0 but NEURON_RT_VISIBLE_CORES=32-63 starts at core 32" in log


# -- consumer slots ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_pair():
    prefill, decode = start_pair(decode_extra=["--max-num-seqs", "2"])
    with running(prefill, decode):
        yield prefill, decode


def test_consumer_reserves_slots_on_arrival(small_pair):
    prefill, decode = small_pair
    body = completion_body("reserve me", 3)
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(post, decode, COMPLETIONS, body, f"res-{i}") for i in range(3)]
        stats = wait_until(
            lambda: (s := sim_stats(decode))["slots_in_use"] == 2 and s["waiting"] == 1 and s,
            5,
            "2 consumer slots reserved before any prefill ran",
        )
        assert stats["transferring"] == 2 and stats["running"] == 0
        m = metrics(decode)  # vLLM counts the running queue only
        assert m["vllm:num_requests_running"] == 0 and m["di_sim:num_requests_transferring"] == 2
        assert m["vllm:num_requests_waiting"] == 1
        for i in range(3):
            assert (
                post(prefill, COMPLETIONS, {**body, "max_tokens": 1}, f"res-{i}").status_code == 200
            )
        results = [f.result() for f in futures]
    assert all(len(texts(r)[0].split()) == 3 for r in results)
    assert sim_stats(decode)["slots_in_use"] == 0
    wait_until(lambda: sim_stats(prefill)["slots_in_use"] == 0, 5, "prefill slots released")
