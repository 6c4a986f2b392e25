"""Issue 12: any-to-any with etcd discovery (Neuron 2.26): 2 prefill + 3 decode simulators
register themselves, the router follows the registry, traffic spreads, a worker that leaves
takes nothing more, a decode killed mid-run loses only its own streams (each ends with an SSE
error event and `[DONE]`), etcd going away does not stop traffic, and a worker that comes back
is readmitted."""

from __future__ import annotations

import json
import signal
import threading

import httpx
import pytest

from tests.discovery.conftest import EtcdServer, needs_etcd
from tests.sse_strict import parse_sse
from tests.support import (
    MODEL,
    DeadBackend,
    Proc,
    free_port_pair,
    running,
    sim_stats,
    start_router,
    wait_until,
)
from tests.support import start_sim as start_sim_proc

pytestmark = needs_etcd


def etcd_kv(role: str, endpoint: str) -> str:
    return json.dumps(
        {"kv_connector": "NeuronConnector", "kv_role": role, "etcd": endpoint,
         "kv_buffer_device": "cpu", "kv_ip": "127.0.0.1", "kv_port": 1}
    )  # fmt: skip


def worker(role: str, endpoint: str, port: int | None = None) -> Proc:
    kv_role = "kv_producer" if role == "prefill" else "kv_consumer"
    port = port or free_port_pair()  # a producer's KV side channel is on its port + 1
    extra = ["--kv-transfer-config", etcd_kv(kv_role, endpoint), "--sim-decode-base-ms", "5"]
    return start_sim_proc("baseline", extra=extra, port=port, name=f"{role}-{port}")


def registered(router: Proc) -> dict[str, set[str]]:
    rows = httpx.get(router.url + "/backends", timeout=5).json()["backends"]
    return {role: {b["url"] for b in rows if b["role"] == role} for role in ("prefill", "decode")}


def complete(url: str, n: int, stream: bool = True) -> list[int]:
    statuses = []
    with httpx.Client(timeout=20) as client:
        for i in range(n):
            body = {"model": MODEL, "prompt": f"etcd {i}", "max_tokens": 4, "stream": stream}
            statuses.append(client.post(url + "/v1/completions", json=body).status_code)
    return statuses


@pytest.fixture
def etcd_stack():
    etcd = EtcdServer()
    workers = [worker("prefill", etcd.endpoint) for _ in range(2)]
    workers += [worker("decode", etcd.endpoint) for _ in range(3)]
    dead = DeadBackend.make()
    router = start_router(
        dead, dead, ["--etcd", etcd.endpoint, "--health-interval", "0.2", "--connect-timeout", "1"]
    )
    try:
        with running(*workers):
            router.wait_ready("/health")
            yield etcd, workers, router
    finally:
        router.stop()
        etcd.close()


def test_discovery_spread_leave_kill_outage_and_return(etcd_stack):
    etcd, workers, router = etcd_stack
    prefills, decodes = workers[:2], workers[2:]
    want = {"prefill": {p.url for p in prefills}, "decode": {d.url for d in decodes}}
    wait_until(lambda: registered(router) == want, 15, "the router sees all five workers")
    router.wait_ready("/ready", timeout=15)

    # Traffic spreads over every worker, and every request completes.
    assert complete(router.url, 30) == [200] * 30
    assert all(sim_stats(p)["kv"]["produced"] > 0 for p in prefills)

    # A worker that leaves (SIGTERM revokes its lease) takes no new request.
    gone = decodes[0]
    gone.stop(signal.SIGTERM)
    wait_until(lambda: gone.url not in registered(router)["decode"], 15, "decode 0 removed")
    assert complete(router.url, 10) == [200] * 10

    # A decode killed mid-run loses only the streams that were on it.
    victim = decodes[1]
    results: list[bytes] = []
    refused: list[dict] = []

    def stream(i: int) -> None:
        body = {"model": MODEL, "prompt": f"long {i}", "max_tokens": 400, "stream": True,
                "ignore_eos": True}  # fmt: skip
        answer = httpx.post(router.url + "/v1/completions", json=body, timeout=30)
        if answer.status_code == 200:
            results.append(answer.content)
        else:  # cut before its first token: a plain OpenAI error the SDKs retry
            assert answer.status_code == 502, answer.text
            refused.append(answer.json())

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    wait_until(lambda: sim_stats(victim)["running"] > 0, 10, "streams on the victim")
    victim.stop(signal.SIGKILL)
    for t in threads:
        t.join(30)
    cut = [p for p in map(parse_sse, results) if "error" in p[-1]]
    whole = [p for p in map(parse_sse, results) if "error" not in p[-1]]
    assert cut or refused  # the victim's streams failed, each one way or the other
    assert len(cut) + len(whole) + len(refused) == 6  # every started stream ended with [DONE]
    assert all(error["code"] == 502 and "decode" in error["message"] for error in refused)
    assert all(sum(len(c["choices"]) for c in p) == 400 for p in whole)

    # etcd going away does not stop traffic (the last known set is kept; the killed decode,
    # still registered until its lease expires, is ejected on its first refused connection).
    etcd.stop()
    assert set(complete(router.url, 6)) == {200}

    # etcd back (empty): workers register again; a returning worker is readmitted.
    etcd.restart(fresh=True)
    back = worker("decode", etcd.endpoint, port=int(gone.url.rsplit(":", 1)[1]))
    with running(back):
        # An empty etcd empties the router's sets until the workers register again.
        expected = {"prefill": want["prefill"], "decode": {back.url, decodes[2].url}}
        wait_until(lambda: registered(router) == expected, 30, "every live worker readmitted")
        before = sim_stats(back)
        statuses = complete(router.url, 20)
        assert statuses == [200] * 20
        assert sim_stats(back) != before  # it serves again
