"""Issue 4: after a known mix of requests, every counter and histogram count is exact.

The mix: 3 streamed and 2 unary successes, 1 upstream 5xx (decode's KV pull times out), 1
client that gives up during prefill, 1 request the decode server rejects (400: a client error,
not an upstream failure) and 1 the router itself rejects (400). Expected values come from what
the client sent and what the simulators reported in `usage`, never from the router.
"""

from __future__ import annotations

import re
from typing import Any

import httpx
import pytest

from tests.observability.conftest import (
    ALLOWED_LABELS,
    by_label,
    samples,
    value,
    wait_settled,
)
from tests.sse_strict import parse_sse
from tests.support import MODEL, di_stack

PER_TOKEN_US = 5000  # prefill: 5 ms per prompt token, so a long prompt takes a known while
KV_TIMEOUT_S = 0.8  # decode fails (500) when prefill's KV has not come within this
LONG_PROMPT = " ".join(["word"] * 300)  # ~1.5 s of prefill: longer than KV_TIMEOUT_S
MAX_TOKENS = 4
CLIENT_GIVES_UP_S = 0.2


@pytest.fixture(scope="module")
def stack():
    with di_stack(
        prefill_extra=["--sim-prefill-per-token-us", str(PER_TOKEN_US)],
        decode_extra=["--sim-kv-timeout", str(KV_TIMEOUT_S)],
    ) as s:
        yield s


def completion(prompt: str = "hello there", **extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, **extra}


def chat(text: str = "hello there", **extra: Any) -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": text}],
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        **extra,
    }


STREAM = {"stream": True, "stream_options": {"include_usage": True}}
PATHS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}


def streamed(url: str, endpoint: str, body: dict[str, Any], rid: str) -> tuple[dict, int, str]:
    """(usage, token chunks seen, router id) of a successful streamed request."""
    r = httpx.post(url + PATHS[endpoint], json=body, headers={"X-Request-Id": rid}, timeout=30)
    assert r.status_code == 200, r.text
    chunks = parse_sse(r.content)
    usage = [c["usage"] for c in chunks if not c["choices"] and c.get("usage")]
    assert len(usage) == 1, chunks
    tokens = 0
    for c in chunks:
        for choice in c["choices"]:
            piece = (
                choice.get("text") if endpoint == "completions" else choice["delta"].get("content")
            )
            tokens += bool(piece)  # each sim token is a non-empty word
    return usage[0], tokens, r.headers["X-Request-Id"]


def test_known_mix_gives_exact_metrics(stack):
    url = stack.router.url
    client_ids = [f"client-req-{i}" for i in range(9)]
    router_ids: list[str] = []
    prompt_tokens = generation_tokens = itl_gaps = 0

    # 3 streamed successes (2 completions, 1 chat).
    for i, (endpoint, body) in enumerate(
        [
            ("completions", completion(**STREAM)),
            ("completions", completion("a b c", **STREAM)),
            ("chat", chat(**STREAM)),
        ]
    ):
        usage, tokens, rid = streamed(url, endpoint, body, client_ids[i])
        assert usage["completion_tokens"] == tokens == MAX_TOKENS
        prompt_tokens += usage["prompt_tokens"]
        generation_tokens += usage["completion_tokens"]
        itl_gaps += tokens - 1
        router_ids.append(rid)

    # 2 unary successes.
    for i, (endpoint, body) in enumerate([("completions", completion()), ("chat", chat())], 3):
        r = httpx.post(
            url + PATHS[endpoint], json=body, headers={"X-Request-Id": client_ids[i]}, timeout=30
        )
        assert r.status_code == 200, r.text
        prompt_tokens += r.json()["usage"]["prompt_tokens"]
        generation_tokens += r.json()["usage"]["completion_tokens"]
        router_ids.append(r.headers["X-Request-Id"])

    # The router rejects n > 1 itself; the decode server rejects a context that is too long.
    r = httpx.post(url + PATHS["chat"], json=chat(n=2), headers={"X-Request-Id": client_ids[5]})
    assert r.status_code == 400, r.text
    router_ids.append(r.headers["X-Request-Id"])
    r = httpx.post(
        url + PATHS["completions"],
        json=completion(LONG_PROMPT, max_tokens=10_000),
        headers={"X-Request-Id": client_ids[6]},
        timeout=30,
    )
    assert r.status_code == 400, r.text
    router_ids.append(r.headers["X-Request-Id"])

    # Upstream failure: prefill is slower than decode's KV wait, so decode fails (an error
    # event in its stream, a 500 for a whole answer), which the router reports as a 502.
    r = httpx.post(
        url + PATHS["completions"],
        json=completion(LONG_PROMPT),
        headers={"X-Request-Id": client_ids[7]},
        timeout=30,
    )
    assert r.status_code == 502, r.text
    router_ids.append(r.headers["X-Request-Id"])

    # The client gives up during prefill, before any byte of the answer.
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            url + PATHS["completions"],
            json=completion(LONG_PROMPT, **STREAM),
            headers={"X-Request-Id": client_ids[8]},
            timeout=CLIENT_GIVES_UP_S,
        )

    text = wait_settled(stack.router, 9)

    assert by_label(text, "di_router_requests_total", "endpoint", "status") == {
        ("completions", "200"): 3.0,
        ("chat", "200"): 2.0,
        ("chat", "400"): 1.0,
        ("completions", "400"): 1.0,
        ("completions", "502"): 1.0,
        ("completions", "499"): 1.0,
    }
    assert value(text, "di_router_requests_in_flight") == 0

    def count(name: str) -> float:
        return value(text, f"di_router_{name}_count")

    assert count("e2e_request_latency_seconds") == 9  # every request, however it ended
    assert count("time_to_first_token_seconds") == 3  # tokens were sent on 3 streams only
    # Prefill finished for the 5 successes and for the 502: decode, read as a stream, tells its
    # failure in an event after its headers, which the router reads after prefill's token.
    assert count("prefill_latency_seconds") == 6
    assert count("kv_handoff_seconds") == 3  # decode's first token, on the 3 streams
    assert count("inter_token_latency_seconds") == itl_gaps == 3 * (MAX_TOKENS - 1)
    for name in (
        "e2e_request_latency_seconds",
        "time_to_first_token_seconds",
        "prefill_latency_seconds",
        "kv_handoff_seconds",
        "inter_token_latency_seconds",
    ):
        assert value(text, f"di_router_{name}_bucket", le="+Inf") == count(name), name
    # The failed request waited for decode's KV timeout: at least one e2e above 0.8 s.
    e2e_over = count("e2e_request_latency_seconds") - value(
        text, "di_router_e2e_request_latency_seconds_bucket", le="0.8"
    )
    assert e2e_over >= 1
    assert value(text, "di_router_e2e_request_latency_seconds_sum") >= KV_TIMEOUT_S

    assert value(text, "di_router_prompt_tokens_total") == prompt_tokens
    assert value(text, "di_router_generation_tokens_total") == generation_tokens
    assert generation_tokens == 5 * MAX_TOKENS

    # Only the 5xx is an upstream error; the backend's 400 is the client's fault.
    assert by_label(text, "di_router_upstream_errors_total", "role", "error_type") == {
        ("decode", "stream_error"): 1.0  # a non-streamed answer: decode is read as a stream
    }
    assert value(text, "di_router_client_disconnects_total") == 1
    assert by_label(text, "di_router_backend_up", "role") == {("prefill",): 1.0, ("decode",): 1.0}

    # Bounded labels only: no request id (the router's or the client's) anywhere.
    ids = set(router_ids) | set(client_ids)
    assert len(set(router_ids)) == 8
    for s in samples(text):
        if not s.name.startswith("di_router_"):
            continue
        assert set(s.labels) <= ALLOWED_LABELS, s
        for label_value in s.labels.values():
            assert not re.search(r"[0-9a-f]{16}", label_value), s
            assert not any(i in label_value for i in ids), s
        assert s.labels.get("model_name", MODEL) in (MODEL, "unknown"), s
