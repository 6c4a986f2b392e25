"""Producer + consumer with one X-Request-Id reproduce the baseline's greedy output exactly."""

from __future__ import annotations

import concurrent.futures

import httpx
import pytest

from tests.support import MODEL, free_port, running, sim_stats, start_sim


@pytest.fixture(scope="module")
def trio():
    kv_port = free_port()
    procs = (start_sim("baseline"), start_sim("prefill", kv_port=kv_port),
             start_sim("decode", kv_port=kv_port, extra=["--sim-kv-timeout", "1"]))
    with running(*procs):
        yield procs


def test_pair_matches_baseline_greedy(trio):
    baseline, prefill, decode = trio
    body = {"model": MODEL, "prompt": ["a tornado is a", "the sky"], "max_tokens": 12,
            "temperature": 0}
    expected = httpx.post(baseline.url + "/v1/completions", json=body).json()
    headers = {"X-Request-Id": "pair-1"}
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        p = pool.submit(httpx.post, prefill.url + "/v1/completions",
                        json={**body, "max_tokens": 1}, headers=headers)
        d = pool.submit(httpx.post, decode.url + "/v1/completions", json=body, headers=headers)
        p_resp, d_resp = p.result(), d.result()
    assert p_resp.status_code == 200 and d_resp.status_code == 200
    got = d_resp.json()
    assert got["id"] == "cmpl-pair-1"
    assert [c["text"] for c in got["choices"]] == [c["text"] for c in expected["choices"]]
    assert got["usage"] == expected["usage"]
    assert sim_stats(prefill)["kv"] == {"produced": 2, "pulled": 2, "expired": 0, "pending": 0}


def test_mismatched_ids_fail_after_timeout_and_pin_prefill_slot(trio):
    _, prefill, decode = trio
    body = {"model": MODEL, "prompt": "hello there", "max_tokens": 4, "temperature": 0}
    before = sim_stats(prefill)
    p = httpx.post(prefill.url + "/v1/completions", json={**body, "max_tokens": 1},
                   headers={"X-Request-Id": "left"})
    d = httpx.post(decode.url + "/v1/completions", json=body, headers={"X-Request-Id": "right"})
    assert p.status_code == 200
    assert d.status_code == 500
    assert "cmpl-right-0" in d.json()["message"]
    after = sim_stats(prefill)
    assert after["slots_in_use"] == before["slots_in_use"] + 1
    assert after["kv"]["pending"] == before["kv"]["pending"] + 1
    assert sim_stats(decode)["slots_in_use"] == 0
