"""Token-exact through `--kv-protocol nixl`: the matrix of `test_matrix.py` against simulators
speaking vLLM V1's NixlConnector, and 2 prefill + 2 decode servers paired any to any."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from tests.router.conftest import is_openai_error
from tests.router.test_matrix import EOS_P, _body, _cases, _compare
from tests.sim.nixl import nixl_sim
from tests.support import (
    ROUTER_TEST_FLAGS,
    Proc,
    running,
    sim_stats,
    start_router,
    start_sim,
    wait_until,
)

EOS = ["--sim-eos-probability", str(EOS_P)]
SINGLE_PROMPT_CASES = [case for case in _cases() if case[2] == "one"]


@dataclass
class NixlStack:
    baseline: Proc
    prefills: list[Proc]
    decodes: list[Proc]
    router: Proc


@pytest.fixture(scope="module")
def stack() -> Iterator[NixlStack]:
    """Two NIXL prefill and two NIXL decode servers behind one router, and a baseline."""
    prefills = [nixl_sim(f"prefill{i}", EOS) for i in range(2)]
    decodes = [nixl_sim(f"decode{i}", EOS) for i in range(2)]
    urls = [flag for p in prefills for flag in ("--prefill", p.url)]
    urls += [flag for d in decodes for flag in ("--decode", d.url)]
    flags = [*ROUTER_TEST_FLAGS, "--kv-protocol", "nixl", *urls]
    router = start_router(prefills[0], decodes[0], flags)
    baseline = start_sim("baseline", extra=EOS)
    with running(baseline, *prefills, *decodes, router):
        router.wait_ready("/ready", timeout=15)
        yield NixlStack(baseline, prefills, decodes, router)


@pytest.fixture(scope="module")
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=30) as c:
        yield c


@pytest.mark.parametrize(
    ("endpoint", "stream", "kind", "sampling", "usage", "max_tokens", "eos"),
    SINGLE_PROMPT_CASES,
    ids=lambda v: str(v),
)
def test_router_equals_baseline(
    stack, client, endpoint, stream, kind, sampling, usage, max_tokens, eos
) -> None:
    chat = endpoint == "chat"
    got = _compare(
        stack, client, _body(endpoint, stream, kind, sampling, usage, max_tokens, eos), chat
    )
    if eos:
        assert got["finish"][0] == "stop" and got["text"][0] == ""


def test_every_prefill_serves_every_decode_and_nothing_stays_held(stack, client) -> None:
    """Each role picked on its own (power of two choices over idle servers: at random): every
    prefill's KV pulled, every decode pulling from both prefills, and no slot held afterwards.
    (32 requests: a server left out by chance has odds of about 2^-16.)"""
    before = {p: sim_stats(p)["kv"]["pulled"] for p in stack.prefills}
    for i in range(32):
        body = _body("completions", i % 2 == 0, "one", "seeded", False, 5, False)
        _compare(stack, client, body, chat=False)
    for proc in (*stack.prefills, *stack.decodes):
        stats = wait_until(
            lambda proc=proc: (s := sim_stats(proc))["slots_in_use"] == 0 and s,
            5,
            f"{proc.name} idle",
        )
        assert stats["kv"]["pending"] == 0, stats
    for p in stack.prefills:
        assert sim_stats(p)["kv"]["pulled"] > before[p], p.name
    for d in stack.decodes:
        assert sim_stats(d)["kv_producers_pulled_from"] == 2, d.name


def test_a_prompt_list_is_refused_by_name(stack, client) -> None:
    """vLLM V1 answers a prompt list's prefill with the first prompt's KV only, so it cannot be
    served exactly: a 400 naming `prompt`, before any server is asked."""
    body = _body("completions", False, "list", "greedy", False, 5, False)
    response = client.post(stack.router.url + "/v1/completions", json=body)
    assert is_openai_error(response, 400)["param"] == "prompt"
