"""Issue 10: a table of bad requests, each with the status and OpenAI error type it must get.

None gets a 500, none hangs (every request has a 10 s deadline), the in-flight gauge returns to
zero after each, and the router serves normally afterwards. What other files already cover is
not repeated here: malformed top-level bodies, oversized bodies and fields DI cannot honour
(`test_auth_and_input.py`), random field values (`test_fuzz_input.py`), deep nesting inside a
field (`test_misbehaving_backends.py`), slow bodies (`test_hardening.py`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest

from tests.router.conftest import in_flight, metric, wait_idle
from tests.support import MODEL, DIStack, di_stack, wait_until

TYPES = {400: "BadRequestError", 404: "NotFoundError"}
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"


def completion(**fields: Any) -> bytes:
    body = {"model": MODEL, "prompt": "hello", "max_tokens": 2, **fields}
    return orjson.dumps({k: v for k, v in body.items() if v is not _DROP})


def chat(**fields: Any) -> bytes:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    body.update(fields)
    return orjson.dumps({k: v for k, v in body.items() if v is not _DROP})


_DROP = object()
"""A field value meaning: leave the field out."""


def case(id: str, body: bytes, status: int, path: str = COMPLETIONS, **headers: str) -> Any:
    return pytest.param(path, body, headers, status, id=id)


CASES = [
    # -- bytes that are not a JSON object the router can read
    case("number", b"42", 400),
    case("true", b"true", 400),
    case("truncated", b'{"model": "m", "prompt": "hi"', 400),
    case("trailing-garbage", completion() + b" x", 400),
    case("two-documents", completion() + completion(), 400),
    case("single-quotes", b"{'model': 'm', 'prompt': 'hi'}", 400),
    case("comment", b"// hi\n" + completion(), 400),
    case("nan", completion()[:-1] + b', "temperature": NaN}', 400),
    case("infinity", completion()[:-1] + b', "temperature": Infinity}', 400),
    case("number-beyond-double", completion()[:-1] + b', "temperature": 1e400}', 400),
    case("utf8-bom", b"\xef\xbb\xbf" + completion(), 400),
    case("latin1-in-string", completion(prompt="caf\u00e9").replace(b"\xc3\xa9", b"\xe9"), 400),
    case("lone-surrogate", completion()[:-1] + b', "user": "\\ud800"}', 400),
    case("utf16", completion().decode().encode("utf-16"), 400),
    case("nested-beyond-the-parser", b'{"x": ' + b"[" * 5000 + b"]" * 5000 + b"}", 400),
    case(
        "nested-objects-300",
        completion()[:-1] + b', "x": ' + b'{"a":' * 300 + b"1" + b"}" * 300 + b"}",
        400,
    ),
    case("form-encoded", b"model=m&prompt=hi", 400, **{"Content-Type": "x-www-form-urlencoded"}),
    # -- the content type is not what decides: JSON is JSON (as FastAPI reads a missing one)
    case("no-content-type", completion(), 200, **{"Content-Type": ""}),
    case("text-plain", completion(), 200, **{"Content-Type": "text/plain"}),
    # -- model
    case("model-missing", completion(model=_DROP), 400),
    case("model-number", completion(model=123), 400),
    case("model-null", completion(model=None), 400),
    case("model-list", completion(model=[MODEL]), 400),
    case("model-empty", completion(model=""), 404),
    case("model-100k", completion(model="m" * 100_000), 404),
    # -- prompt
    case("prompt-missing", completion(prompt=_DROP), 400),
    case("prompt-null", completion(prompt=None), 400),
    case("prompt-number", completion(prompt=5), 400),
    case("prompt-object", completion(prompt={}), 400),
    case("prompt-empty-list", completion(prompt=[]), 400),
    case("prompt-ints-and-str", completion(prompt=[1, "a"]), 400),
    case("prompt-str-and-int", completion(prompt=["a", 1]), 400),
    case("prompt-lists-and-str", completion(prompt=[[1, 2], "a"]), 400),
    case("prompt-floats", completion(prompt=[1.5, 2.5]), 400),
    # an empty prompt is one token (BOS) for vLLM, so it is served
    case("prompt-empty-string", completion(prompt=""), 200),
    case("prompt-list-of-empty-string", completion(prompt=[""]), 200),
    case("prompt-list-of-null", completion(prompt=[None]), 400),
    case("prompt-nested-3", completion(prompt=[[[1]]]), 400),
    # -- token limits (validated by the router first: prefill must not accept what decode won't)
    case("max-tokens-negative", completion(max_tokens=-1), 400),
    case("max-tokens-zero", completion(max_tokens=0), 400),
    case("max-tokens-string", completion(max_tokens="ten"), 400),
    case("max-tokens-fraction", completion(max_tokens=1.5), 400),
    case("max-tokens-list", completion(max_tokens=[2]), 400),
    case("max-tokens-1e30", completion(max_tokens=1e30), 400),
    case("max-tokens-2**63", completion()[:-1] + b', "max_tokens": 9223372036854775808}', 400),
    case("max-tokens-2**64", completion()[:-1] + b', "max_tokens": 18446744073709551616}', 400),
    case("max-tokens-negative-stream", completion(max_tokens=-1, stream=True), 400),
    case("min-tokens-negative", completion(min_tokens=-1), 400),
    case("min-tokens-above-max", completion(min_tokens=5, max_tokens=2), 400),
    case("min-tokens-above-max-stream", completion(min_tokens=5, max_tokens=2, stream=True), 400),
    case("min-tokens-string", completion(min_tokens="one"), 400),
    # -- sampling fields
    case("temperature-negative", completion(temperature=-1), 400),
    case("temperature-string", completion(temperature="hot"), 400),
    case("top-p-above-one", completion(top_p=2), 400),
    case("top-k-negative", completion(top_k=-5), 400),
    case("seed-string", completion(seed="x"), 400),
    case("stop-number", completion(stop=5), 400),
    case("stop-list-of-ints", completion(stop=[1]), 400),
    case("stop-token-ids-strings", completion(stop_token_ids=["a"]), 400),
    case("logprobs-negative", completion(logprobs=-1), 400),
    # -- stream flags
    case("stream-string", completion(stream="maybe"), 400),
    case("stream-list", completion(stream=[]), 400),
    case("stream-options-string", completion(stream=True, stream_options="yes"), 400),
    case(
        "stream-options-include-usage-list",
        completion(stream=True, stream_options={"include_usage": []}),
        400,
    ),
    # -- fields DI cannot honour, in the shapes vLLM coerces (the plain ones: test_auth_and_input)
    case("n-zero", completion(n=0), 400),
    case("n-string", completion(n="2"), 400),
    case("n-fraction", completion(n=2.5), 400),
    case("best-of-string", completion(best_of="3"), 400),
    case("beam-search-string", completion(use_beam_search="true"), 400),
    case("echo-string-with-logprobs", completion(echo="yes", logprobs=1), 400),
    case("prompt-logprobs-string", completion(prompt_logprobs="1"), 400),
    # -- chat messages
    case("chat-messages-missing", chat(messages=_DROP), 400, CHAT),
    case("chat-messages-string", chat(messages="hi"), 400, CHAT),
    case("chat-messages-empty", chat(messages=[]), 400, CHAT),
    case("chat-messages-numbers", chat(messages=[1, 2]), 400, CHAT),
    case("chat-max-completion-tokens-negative", chat(max_completion_tokens=-3), 400, CHAT),
    # vLLM 0.7.2 reads `max_completion_tokens or max_tokens`: 0 falls back to max_tokens
    case("chat-max-completion-tokens-zero", chat(max_completion_tokens=0), 200, CHAT),
    case("chat-max-completion-tokens-string", chat(max_completion_tokens="x"), 400, CHAT),
    case("chat-min-above-max-completion", chat(min_tokens=9, max_completion_tokens=3), 400, CHAT),
    case("chat-logprobs-string", chat(logprobs="many"), 400, CHAT),
    case("chat-prompt-instead-of-messages", completion(), 400, CHAT),
]


@pytest.fixture(scope="module")
def stack() -> Iterator[DIStack]:
    with di_stack() as s:
        yield s
        # The whole table left nothing behind, and the router still serves.
        wait_idle(s.router, *s.sims)
        assert metric(s.router, "di_router_requests_total", status="500") == 0
        got = httpx.post(s.router.url + COMPLETIONS, content=completion(), timeout=10)
        assert got.status_code == 200 and got.json()["usage"]["completion_tokens"] == 2


@pytest.mark.parametrize(("path", "raw", "headers", "status"), CASES)
def test_bad_input(
    stack: DIStack, path: str, raw: bytes, headers: dict[str, str], status: int
) -> None:
    sent = {"Content-Type": "application/json", **headers}
    got = httpx.post(
        stack.router.url + path,
        content=raw,
        headers={k: v for k, v in sent.items() if v},
        timeout=10,
    )
    assert got.status_code == status, got.text[:500]
    if status == 200:
        assert got.json()["choices"], got.text
    else:
        error = got.json()
        assert error["object"] == "error" and error["code"] == status, error
        assert error["type"] == TYPES[status], error
        assert isinstance(error["message"], str) and 0 < len(error["message"]) < 2000, error
    wait_until(lambda: in_flight(stack.router) == 0, 5, "in-flight gauge back to 0")
