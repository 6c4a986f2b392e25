"""vLLM V1 NixlConnector semantics (vllm-project/vllm,
`vllm/distributed/kv_transfer/kv_connector/v1/nixl_connector.py` and the P/D proxy
`tests/v1/kv_connector/nixl_integration/toy_proxy_server.py`): a producer keeps a length-capped
request's KV until it is pulled or `VLLM_NIXL_ABORT_REQUEST_TIMEOUT` passes and says where it is
in `kv_transfer_params`; any consumer pulls it from the named side channel and computes every
output token itself; aborts free slots on both sides."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from di_router.router.nixl import REMOTE_DECODE
from tests.eos_prompts import eos_first_prompt
from tests.sim.conftest import (
    CHAT,
    COMPLETIONS,
    chat_body,
    completion_body,
    open_then_close,
    post,
    stream,
    texts,
)
from tests.sim.nixl import nixl_sim
from tests.support import Proc, free_port, running, sim_stats, start_sim, wait_until

PROMPT = " ".join(f"word{i}" for i in range(40))  # 41 tokens with BOS: 3 blocks of 16
EOS_P = 0.03
EOS = ["--sim-eos-probability", str(EOS_P)]
P1_SIDE_CHANNEL = free_port()


@pytest.fixture(scope="module")
def servers() -> Iterator[dict[str, Proc]]:
    procs = {
        "baseline": start_sim("baseline", extra=EOS),
        "p1": nixl_sim("p1", EOS, side_channel_port=P1_SIDE_CHANNEL),
        "p2": nixl_sim("p2", EOS),
        "d1": nixl_sim("d1", EOS),
        "d2": nixl_sim("d2", EOS),
    }
    with running(*procs.values()):
        yield procs


def prefill(proc: Proc, path: str, body: dict[str, Any], rid: str) -> dict[str, Any]:
    """The prefill leg as vLLM's proxy sends it; returns the answer's kv_transfer_params."""
    leg = {**body, "max_tokens": 1, "stream": False, "kv_transfer_params": REMOTE_DECODE}
    leg.pop("max_completion_tokens", None)
    response = post(proc, path, leg, rid)
    assert response.status_code == 200, response.text
    return response.json()["kv_transfer_params"]


def idle(proc: Proc) -> bool:
    s = sim_stats(proc)
    return s["slots_in_use"] == 0 and not (s["transferring"] or s["running"] or s["waiting"])


def test_producer_keeps_the_kv_and_says_where(servers) -> None:
    p1 = servers["p1"]
    params = prefill(p1, COMPLETIONS, completion_body(PROMPT, 20), "where-1")
    assert params["do_remote_prefill"] is True and params["do_remote_decode"] is False
    assert params["remote_host"] == "127.0.0.1" and params["remote_port"] == P1_SIDE_CHANNEL
    assert params["remote_request_id"] == "cmpl-where-1-0"
    assert len(params["remote_block_ids"]) == math.ceil(41 / 16)
    assert isinstance(params["remote_engine_id"], str) and params["remote_engine_id"]
    stats = sim_stats(p1)
    assert stats["transferring"] == 1 and stats["slots_in_use"] == 1, stats
    assert stats["kv"]["pending"] == 1
    # Pulled by a consumer, the entry and its slot are freed.
    pull = {**completion_body(PROMPT, 3), "kv_transfer_params": params}
    decode = post(servers["d1"], COMPLETIONS, pull)
    assert decode.status_code == 200, decode.text
    wait_until(lambda: idle(p1) and sim_stats(p1)["kv"]["pulled"] >= 1, 5, "the entry pulled")


@pytest.mark.parametrize(("p", "d"), list(itertools.product(("p1", "p2"), ("d1", "d2"))))
@pytest.mark.parametrize("chat", [False, True])
@pytest.mark.parametrize("streamed", [False, True])
def test_any_producer_serves_any_consumer_token_exact(servers, p, d, chat, streamed) -> None:
    """Decode computes every token itself (its usage counts all of them) and, with the
    simulator's deterministic sampling, equals a baseline server."""
    path = CHAT if chat else COMPLETIONS
    make = chat_body if chat else completion_body
    body = make(PROMPT, 12, temperature=0.7, seed=7)
    rid = f"{p}-{d}-{chat}-{streamed}"
    params = prefill(servers[p], path, body, rid)
    pulled = {**body, "kv_transfer_params": params}
    baseline = post(servers["baseline"], path, body)
    expected, expected_usage = texts(baseline), baseline.json()["usage"]["completion_tokens"]
    if streamed:
        _, got = stream(servers[d], path, {**pulled, "stream_options": {"include_usage": True}})
        assert [got["text"][0]] == expected
        assert got["usage"]["completion_tokens"] == expected_usage
    else:
        answer = post(servers[d], path, pulled, f"{rid}-decode")  # its own id: pulled by name
        assert texts(answer) == expected
        assert answer.json()["usage"]["completion_tokens"] == expected_usage
        assert answer.json()["kv_transfer_params"] is None
    wait_until(lambda: idle(servers[p]) and idle(servers[d]), 5, "both sides idle")


def test_unpulled_kv_is_freed_after_the_abort_timeout() -> None:
    with running(nixl_sim("p", abort_timeout=0.5), nixl_sim("d")) as (p, d):
        params = prefill(p, COMPLETIONS, completion_body(PROMPT, 5), "late")
        assert sim_stats(p)["slots_in_use"] == 1
        wait_until(lambda: sim_stats(p)["kv"]["expired"] == 1, 5, "the entry expired")
        assert idle(p)
        # A consumer that comes too late fails (kv_load_failure_policy "fail") and frees its slot.
        late = post(d, COMPLETIONS, {**completion_body(PROMPT, 5), "kv_transfer_params": params})
        assert late.status_code == 500
        assert "no KV for request 'cmpl-late-0'" in late.json()["message"]
        wait_until(lambda: idle(d), 5, "the consumer idle")


def test_consumer_abort_frees_a_request_waiting_for_kv(servers) -> None:
    """V1's scheduler finds a request waiting for remote KV in `waiting`: an abort frees it
    (unlike Neuron V0's `transferring`)."""
    d = servers["d2"]
    before = sim_stats(d)["aborted"]
    nowhere = {**REMOTE_DECODE, "do_remote_decode": False, "do_remote_prefill": True}
    nowhere |= {"remote_host": "127.0.0.1", "remote_port": free_port(), "remote_block_ids": [0]}
    body = {**completion_body(PROMPT, 5), "kv_transfer_params": nowhere}
    with (
        httpx.Client(timeout=30) as client,
        client.stream("POST", d.url + COMPLETIONS, json={**body, "stream": True}) as response,
    ):
        assert response.status_code == 200
        wait_until(lambda: sim_stats(d)["transferring"] == 1, 5, "the request transferring")
    wait_until(lambda: idle(d), 5, "the aborted request's slot freed")
    assert sim_stats(d)["aborted"] == before + 1
    assert sim_stats(d)["aborts_ignored"] == 0


def test_producer_abort_before_its_token_keeps_nothing() -> None:
    with running(nixl_sim("p", ["--sim-prefill-base-ms", "3000"])) as (p,):
        body = {**completion_body(PROMPT, 5), "stream": True, "kv_transfer_params": REMOTE_DECODE}
        open_then_close(p, COMPLETIONS, body, events=0)
        wait_until(lambda: sim_stats(p)["aborted"] == 1, 10, "the prefill aborted")
        wait_until(lambda: idle(p), 10, "its slot freed")
        assert sim_stats(p)["kv"]["produced"] == 0


def test_eos_first_keeps_no_kv(servers) -> None:
    """Only a length-capped request keeps its blocks (`request_finished`); EOS as the first
    token finishes with "stop", so the answer has no params and nothing is pinned."""
    p = servers["p2"]
    prompt = eos_first_prompt(False, {"temperature": 0}, EOS_P)
    body = {**completion_body(prompt, 1), "kv_transfer_params": REMOTE_DECODE}
    answer = post(p, COMPLETIONS, body)
    assert answer.status_code == 200
    assert answer.json()["choices"][0]["finish_reason"] == "stop"
    assert answer.json()["kv_transfer_params"] is None
    assert sim_stats(p)["kv"]["pending"] == 0 and idle(p)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ("yes", "kv_transfer_params: Input should be a valid dictionary"),
        ({"do_remote_prefill": True}, "needs remote_host and remote_port"),
    ],
)
def test_bad_kv_transfer_params_are_a_400(servers, params, message) -> None:
    body = {**completion_body(PROMPT, 3), "kv_transfer_params": params}
    answer = post(servers["d1"], COMPLETIONS, body)
    assert answer.status_code == 400 and message in answer.json()["message"]


def test_a_prompt_list_cannot_pull_one_prompts_kv() -> None:
    """vLLM answers a prompt list with the first prompt's params (`serving_completion`) and
    would hand them to every prompt of the consumer's list; the simulator refuses that."""
    with running(nixl_sim("p", abort_timeout=0.5), nixl_sim("d")) as (p, d):
        params = prefill(p, COMPLETIONS, completion_body([PROMPT, "a b"], 4), "list")
        assert params["remote_request_id"] == "cmpl-list-0"
        assert sim_stats(p)["kv"]["pending"] == 2  # both prompts' KV is kept
        body = {**completion_body([PROMPT, "a b"], 4), "kv_transfer_params": params}
        answer = post(d, COMPLETIONS, body)
        assert answer.status_code == 400 and "one prompt" in answer.json()["message"]
