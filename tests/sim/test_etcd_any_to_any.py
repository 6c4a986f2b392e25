"""Neuron 2.26 with etcd: no pairing at startup; each leg's `X-Request-Id` names its peer.

Read against aws-neuron/upstreaming-to-vllm commit e13d1a758 (the xPyD connector, later
reverted on the 2.24 branch; the 2.26 connector itself is not public): prefill gets
`cmpl-<uuid>_<decode ip>:<decode port>`, decode `cmpl-<uuid>_<prefill ip>:<prefill port>`
(`neuron_immediate_first_token_proxy_server.py`); `parse_request_id` splits the peer off and
keys the KV by the rest; `maybe_setup_buffer` puts a producer's side channel on its HTTP port
+ 1. Everything else is 2.24's: decode repeats the pulled token, transferring requests cannot
be aborted.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import json
import uuid
from collections.abc import Iterator

import pytest

from di_router.discovery import EtcdClient
from tests.discovery.conftest import EtcdServer, etcd, needs_etcd  # noqa: F401 (fixture)
from tests.sim.conftest import CHAT, COMPLETIONS, chat_body, completion_body, paired, post, texts
from tests.support import Proc, free_port_pair, running, sim_stats, start_sim, wait_until

pytestmark = needs_etcd
PROMPT = "the quick brown fox jumps over the lazy dog"


def etcd_sim(name: str, kv_role: str, endpoint: str) -> Proc:
    """A worker as the 2.26 tutorial starts it: connector, role, buffer size and etcd only."""
    config = {
        "kv_connector": "NeuronConnector",
        "kv_role": kv_role,
        "kv_buffer_size": 2e11,
        "etcd": endpoint,
    }
    extra = ["--kv-transfer-config", json.dumps(config)]
    return start_sim("baseline", extra=extra, name=name, port=free_port_pair())


@pytest.fixture
def cluster(etcd: EtcdServer) -> Iterator[dict[str, Proc]]:  # noqa: F811 (fixture)
    procs = {
        "baseline": start_sim("baseline"),
        **{f"p{i}": etcd_sim(f"p{i}", "kv_producer", etcd.endpoint) for i in (1, 2)},
        **{f"d{i}": etcd_sim(f"d{i}", "kv_consumer", etcd.endpoint) for i in (1, 2)},
    }
    with running(*procs.values()):
        yield procs


def address(proc: Proc) -> str:
    return proc.url.split("://", 1)[1]


def ids(prefill: Proc, decode: Proc) -> tuple[str, str]:
    """(prefill's id, decode's id) as Neuron 2.26's router makes them."""
    base = f"cmpl-{uuid.uuid4().hex}"
    return f"{base}_{address(decode)}", f"{base}_{address(prefill)}"


def idle(proc: Proc) -> bool:
    s = sim_stats(proc)
    return s["slots_in_use"] == 0 and not (s["transferring"] or s["running"] or s["waiting"])


def test_every_prefill_pairs_with_every_decode_by_the_id(cluster) -> None:
    """Servers serve at once (no startup handshake); every P x D combination is token-exact."""
    for p, d in itertools.product(("p1", "p2"), ("d1", "d2")):
        for path, make in ((COMPLETIONS, completion_body), (CHAT, chat_body)):
            body = make(PROMPT, 8)
            prefill_id, decode_id = ids(cluster[p], cluster[d])
            first, rest = paired(cluster[p], cluster[d], path, body, prefill_id, decode_id)
            assert first.status_code == 200, first.text
            assert texts(rest) == texts(post(cluster["baseline"], path, body))
            # vLLM's response id is built from the whole header, peer included.
            assert rest.json()["id"].endswith(decode_id)
    for name in ("p1", "p2", "d1", "d2"):
        wait_until(lambda name=name: idle(cluster[name]), 5, f"{name} idle")
    for name in ("p1", "p2"):
        assert sim_stats(cluster[name])["kv"]["pulled"] == 4, name
    for name in ("d1", "d2"):
        assert sim_stats(cluster[name])["kv_producers_pulled_from"] == 2, name


def test_decode_pulls_only_from_the_prefill_its_id_names(cluster) -> None:
    p1, p2, d1 = cluster["p1"], cluster["p2"], cluster["d1"]
    body = completion_body(PROMPT, 4)
    prefill_id, decode_id = ids(p2, d1)  # decode is told to pull from p2 ...
    assert post(p1, COMPLETIONS, {**body, "max_tokens": 1}, prefill_id).status_code == 200
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        decode = pool.submit(post, d1, COMPLETIONS, body, decode_id)
        # ... so the entry on p1 does not serve it: decode waits in transferring.
        wait_until(lambda: sim_stats(d1)["transferring"] == 1, 5, "decode waiting for KV")
        assert sim_stats(p1)["kv"]["pending"] == 1 and sim_stats(p2)["kv"]["pending"] == 0
        # Once p2 has the same request, decode completes.
        assert post(p2, COMPLETIONS, {**body, "max_tokens": 1}, prefill_id).status_code == 200
        expected = texts(post(cluster["baseline"], COMPLETIONS, body))
        assert texts(decode.result(timeout=10)) == expected
    assert sim_stats(p1)["kv"]["pending"] == 1  # nobody will pull it: its slot stays held


def test_a_decode_leg_without_a_peer_is_a_400(cluster) -> None:
    response = post(cluster["d1"], COMPLETIONS, completion_body(PROMPT, 4), "cmpl-no-peer")
    assert response.status_code == 400
    assert "X-Request-Id must name the prefill server" in response.json()["message"]


def test_workers_register_their_http_ports(cluster, etcd: EtcdServer) -> None:  # noqa: F811
    async def keys() -> set[str]:
        client = EtcdClient(etcd.endpoint)
        try:
            return set((await client.range_prefix("/workers/"))[1])
        finally:
            await client.aclose()

    expected = {f"/workers/prefill/{address(cluster[p]).replace(':', '/')}" for p in ("p1", "p2")}
    expected |= {f"/workers/decode/{address(cluster[d]).replace(':', '/')}" for d in ("d1", "d2")}
    wait_until(lambda: asyncio.run(keys()) == expected, 10, "all four workers registered")
