"""Issue 12: several static prefill/decode pairs behind one router.

A Neuron 2.24 decode server pulls KV only from the producer it paired with at startup, so the
router must pick a pair, never a prefill and a decode of different pairs: a mis-paired decode
would wait for KV its own producer never gets.
"""

from __future__ import annotations

import httpx
import pytest

from tests.router.conftest import metric, wait_idle
from tests.support import MODEL, DeadBackend, free_port, running, sim_stats, start_router, start_sim

REQUESTS = 40


@pytest.mark.parametrize("via", ["flags", "config file"])
def test_two_static_pairs_both_serve_and_never_mix(via, tmp_path):
    kv_a, kv_b = free_port(), free_port()
    pa, da = start_sim("prefill", kv_port=kv_a), start_sim("decode", kv_port=kv_a)
    pb, db = start_sim("prefill", kv_port=kv_b), start_sim("decode", kv_port=kv_b)
    if via == "flags":
        flags = ["--health-interval", "0.2", "--prefill", pa.url, "--decode", da.url]
        flags += ["--prefill", pb.url, "--decode", db.url]
    else:
        config = tmp_path / "router.toml"
        config.write_text(
            f'prefill = ["{pa.url}", "{pb.url}"]\ndecode = ["{da.url}", "{db.url}"]\n'
            "health-interval = 0.2\n"
        )
        flags = ["--config", str(config)]
    router = start_router(pa, da, flags)
    with running(pa, da, pb, db, router):
        router.wait_ready("/ready", timeout=15)
        with httpx.Client(timeout=20) as client:
            for i in range(REQUESTS):
                body = {
                    "model": MODEL,
                    "prompt": f"request {i}",
                    "max_tokens": 3,
                    "stream": i % 2 == 0,
                }
                got = client.post(router.url + "/v1/completions", json=body)
                assert got.status_code == 200, got.text
        stats = wait_idle(router, pa, da, pb, db)
        for prefill, decode in ((pa, da), (pb, db)):
            kv = stats[prefill]["kv"]
            assert kv["produced"] == kv["pulled"] > 0  # this pair served, and only itself
            assert sim_stats(decode)["kv_pull_timeouts"] == 0
        produced = sum(stats[p]["kv"]["produced"] for p in (pa, pb))
        assert produced == REQUESTS
        report = httpx.get(router.url + "/backends").json()
        assert report["pairing"] == "static"
        peers = {(b["url"], b["paired_with"]) for b in report["backends"]}
        assert {(pa.url, da.url), (pb.url, db.url), (da.url, pa.url), (db.url, pb.url)} == peers
        assert all(b["outstanding"] == 0 for b in report["backends"])
        assert metric(router, "di_router_requests_total", status="200") == REQUESTS


def test_unequal_static_pairs_are_refused_at_start():
    dead = DeadBackend.make()
    router = start_router(dead, dead, ["--prefill", dead.url, "--prefill", dead.url])
    try:
        assert router.popen.wait(timeout=10) == 2
    finally:
        router.stop()
    assert "as many prefill as decode servers" in router.log()
