"""Token-exact: what a client gets through the router equals what one baseline server gives.

The matrix of issue 3, point 5: completions and chat x stream and not x one prompt and a list x
greedy and seeded sampling x include_usage on and off x max_tokens 1, 2, 50 x EOS first.
"""

from __future__ import annotations

import itertools
from typing import Any

import httpx
import orjson
import pytest

from tests.eos_prompts import eos_first_prompt
from tests.sse_strict import assemble, check_chunks, parse_sse
from tests.support import MODEL, di_stack

EOS_P = 0.03
SAMPLINGS = {"greedy": {"temperature": 0}, "seeded": {"temperature": 0.7, "seed": 1234}}


@pytest.fixture(scope="module")
def stack():
    with di_stack(sim_extra=["--sim-eos-probability", str(EOS_P)], baseline=True) as s:
        yield s


@pytest.fixture(scope="module")
def client():
    with httpx.Client(timeout=30) as c:
        yield c


def _cases() -> list[tuple[str, bool, str, str, bool, int, bool]]:
    cases = []
    for endpoint, stream, sampling, max_tokens, eos in itertools.product(
        ("completions", "chat"), (True, False), SAMPLINGS, (1, 2, 50), (False, True)
    ):
        prompt_kinds = ("one", "list") if endpoint == "completions" else ("one",)
        usages = (False, True) if stream else (False,)
        for kind, usage in itertools.product(prompt_kinds, usages):
            cases.append((endpoint, stream, kind, sampling, usage, max_tokens, eos))
    return cases


def _body(
    endpoint: str,
    stream: bool,
    kind: str,
    sampling: str,
    usage: bool,
    max_tokens: int,
    eos: bool,
    **extra: Any,
) -> dict[str, Any]:
    chat = endpoint == "chat"
    text = eos_first_prompt(chat, SAMPLINGS[sampling], EOS_P) if eos else "a tornado is a"
    body: dict[str, Any] = {
        "model": MODEL,
        "max_tokens": max_tokens,
        "stream": stream,
        **SAMPLINGS[sampling],
        **extra,
    }
    if chat:
        body["messages"] = [{"role": "user", "content": text}]
    else:
        body["prompt"] = [text, "the weather today", text + " again"] if kind == "list" else text
    if usage:
        body["stream_options"] = {"include_usage": True}
    return body


def _outcome(response: httpx.Response, chat: bool, stream: bool) -> dict[str, Any]:
    assert response.status_code == 200, response.text
    if stream:
        assert response.headers["content-type"].startswith("text/event-stream")
        chunks = parse_sse(response.content)
        check_chunks(chunks, chat)
        return assemble(chunks, chat)
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["id"].startswith("chatcmpl-" if chat else "cmpl-")
    text = {c["index"]: c["message"]["content"] if chat else c["text"] for c in body["choices"]}
    finish = {c["index"]: c["finish_reason"] for c in body["choices"]}
    # The whole body too, field for field and in order (the router rebuilds it from decode's
    # stream): only the id and `created` are the router's own.
    rest = orjson.dumps({k: v for k, v in body.items() if k not in ("id", "created")})
    return {"text": text, "finish": finish, "usage": body["usage"], "body": rest}


def _compare(stack, client, body: dict[str, Any], chat: bool) -> dict[str, Any]:
    path = "/v1/chat/completions" if chat else "/v1/completions"
    stream = body["stream"]
    expected = _outcome(client.post(stack.baseline.url + path, json=body), chat, stream)
    got = _outcome(client.post(stack.router.url + path, json=body), chat, stream)
    assert got == expected
    return got


@pytest.mark.parametrize(
    ("endpoint", "stream", "kind", "sampling", "usage", "max_tokens", "eos"),
    _cases(),
    ids=lambda v: str(v),
)
def test_router_equals_baseline(
    stack, client, endpoint, stream, kind, sampling, usage, max_tokens, eos
):
    chat = endpoint == "chat"
    body = _body(endpoint, stream, kind, sampling, usage, max_tokens, eos)
    got = _compare(stack, client, body, chat)
    if eos:
        assert got["finish"][0] == "stop" and got["text"][0] == ""
    if usage:
        assert got["usage"]["completion_tokens"] >= len(got["text"])
    elif stream:
        assert got["usage"] is None


@pytest.mark.parametrize("stream", [True, False])
@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_min_tokens_keeps_eos_off_the_first_token(stack, client, endpoint, stream):
    """The prefill leg keeps min_tokens >= 1, so an EOS-first prompt generates as baseline."""
    body = _body(endpoint, stream, "one", "greedy", False, 6, True, min_tokens=3)
    got = _compare(stack, client, body, endpoint == "chat")
    assert got["text"][0] != ""


@pytest.mark.parametrize("stream", [True, False])
def test_chat_max_completion_tokens(stack, client, stream):
    body = _body("chat", stream, "one", "greedy", False, 40, False)
    del body["max_tokens"]
    body["max_completion_tokens"] = 7
    got = _compare(stack, client, body, chat=True)
    assert got["finish"][0] in ("length", "stop")


def test_missing_max_tokens_stays_missing(stack, client):
    """Chat without max_tokens generates up to the context limit on both paths."""
    body = _body("chat", False, "one", "seeded", False, 1, False)
    del body["max_tokens"]
    _compare(stack, client, body, chat=True)


def test_stop_strings_and_continuous_usage(stack, client):
    base = _body("completions", True, "one", "greedy", True, 30, False)
    probe = {k: v for k, v in base.items() if k != "stream_options"}
    first = client.post(stack.baseline.url + "/v1/completions", json={**probe, "stream": False})
    words = first.json()["choices"][0]["text"].split()
    assert len(words) >= 2, words
    body = {
        **base,
        "stop": [words[len(words) // 2]],
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
    }
    got = _compare(stack, client, body, chat=False)
    assert got["finish"][0] == "stop"
