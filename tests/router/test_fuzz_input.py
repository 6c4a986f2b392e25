"""Whatever a client sends, the router answers with a valid response or an OpenAI-format error
(never a 500, a hang or a truncated stream) and leaves no request, slot or KV entry behind."""

from __future__ import annotations

import random
from typing import Any

import httpx
import pytest

from tests.router.conftest import wait_idle
from tests.sse_strict import parse_sse
from tests.support import MODEL, di_stack, sim_stats

CASES = 300
ODD_VALUES: list[Any] = [
    None,
    True,
    False,
    0,
    -1,
    1,
    2,
    3,
    10**12,
    1.5,
    -0.5,
    float("1e300"),
    "",
    "1",
    "x" * 300,
    [],
    [1, 2],
    ["a", "b"],
    [[1, 2], [3]],
    [[]],
    {},
    {"a": 1},
    {"include_usage": True},
    {"include_usage": "yes"},
    [{"role": "user"}],
    [{"role": "user", "content": None}],
    [{"role": 5, "content": ["x"]}],
    [{"content": [{"type": "text", "text": "hi"}]}],
]
FIELDS = [
    "model",
    "prompt",
    "messages",
    "max_tokens",
    "max_completion_tokens",
    "min_tokens",
    "temperature",
    "seed",
    "stream",
    "stream_options",
    "stop",
    "stop_token_ids",
    "n",
    "best_of",
    "echo",
    "logprobs",
    "ignore_eos",
    "top_k",
    "top_p",
    "suffix",
    "use_beam_search",
    "prompt_logprobs",
    "include_stop_str_in_output",
    "continuous_usage_stats",
    "user",
]


def _mutated(rng: random.Random, chat: bool) -> dict[str, Any]:
    if chat:
        body: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
    else:
        body = {"model": MODEL, "prompt": "hello there"}
    body.update(
        {"max_tokens": rng.choice([1, 2, 5]), "temperature": 0, "stream": rng.random() < 0.5}
    )
    for _ in range(rng.randint(1, 3)):
        field = rng.choice(FIELDS)
        if rng.random() < 0.15:
            body.pop(field, None)
        else:
            body[field] = rng.choice(ODD_VALUES)
    return body


@pytest.fixture(scope="module")
def stack():
    # `--max-model-len 64`: ridiculous lengths are refused by both servers, not generated.
    with di_stack(sim_extra=["--max-model-len", "64", "--sim-kv-timeout", "5"]) as s:
        yield s


@pytest.mark.timeout(300)
def test_random_bodies_never_break_the_router(stack):
    rng = random.Random(20261126)
    statuses: dict[int, int] = {}
    before = sim_stats(stack.prefill)["kv"]
    with httpx.Client(timeout=30) as client:
        for i in range(CASES):
            chat = rng.random() < 0.5
            body = _mutated(rng, chat)
            path = "/v1/chat/completions" if chat else "/v1/completions"
            got = client.post(stack.router.url + path, json=body)
            statuses[got.status_code] = statuses.get(got.status_code, 0) + 1
            where = f"case {i}: {body} -> {got.status_code} {got.text[:300]}"
            assert got.status_code in (200, 400, 404), where
            if got.status_code != 200:
                error = got.json()
                assert error["object"] == "error" and error["code"] == got.status_code, where
            elif got.headers["content-type"].startswith("text/event-stream"):
                chunks = parse_sse(got.content)  # complete, well-framed, one [DONE]
                assert not any("error" in c for c in chunks), where
            else:
                assert "choices" in got.json(), where
    assert statuses.get(200, 0) > CASES // 10 and statuses.get(400, 0) > CASES // 10, statuses
    stats = wait_idle(stack.router, *stack.sims, timeout=15)
    kv = stats[stack.prefill]["kv"]
    # Every KV entry a prefill produced was pulled: by its decode, or released by the router.
    assert kv["produced"] - before["produced"] == kv["pulled"] - before["pulled"], kv
