"""The official `openai` client against every role, streaming and not.

Prefill requests use max_tokens=1; decode requests are paired with a concurrent prefill request
carrying the same X-Request-Id (`extra_headers`), and must reproduce the baseline's greedy text.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable
from typing import Any

import openai
import pytest

from tests.support import MODEL, Proc

PROMPT = "explain disaggregated inference"
MESSAGES = [{"role": "user", "content": PROMPT}]


def _client(proc: Proc) -> openai.OpenAI:
    return openai.OpenAI(base_url=proc.url + "/v1", api_key="dummy", max_retries=0, timeout=30)


def _complete(proc: Proc, stream: bool, max_tokens: int, rid: str | None = None) -> str:
    extra = {"extra_headers": {"X-Request-Id": rid}} if rid else {}
    result = _client(proc).completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=max_tokens, temperature=0, stream=stream, **extra
    )
    if not stream:
        assert result.id == f"cmpl-{rid}" if rid else result.id.startswith("cmpl-")
        assert result.choices[0].finish_reason == "length"
        assert result.usage is not None and result.usage.completion_tokens == max_tokens
        return result.choices[0].text
    text, finishes = "", []
    for chunk in result:
        assert chunk.id == f"cmpl-{rid}" if rid else chunk.id.startswith("cmpl-")
        text += chunk.choices[0].text
        finishes.append(chunk.choices[0].finish_reason)
    assert finishes == [None] * (max_tokens - 1) + ["length"]
    return text


def _chat(proc: Proc, stream: bool, max_tokens: int, rid: str | None = None) -> str:
    extra = {"extra_headers": {"X-Request-Id": rid}} if rid else {}
    result = _client(proc).chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=max_tokens, temperature=0, stream=stream,
        **extra,
    )  # fmt: skip
    if not stream:
        assert result.id == f"chatcmpl-{rid}" if rid else result.id.startswith("chatcmpl-")
        assert result.choices[0].message.role == "assistant"
        assert result.choices[0].finish_reason == "length"
        return result.choices[0].message.content or ""
    chunks = list(result)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == "length"
    assert len(chunks) == 1 + max_tokens
    return "".join(c.choices[0].delta.content or "" for c in chunks)


CALLS: dict[str, Callable[..., str]] = {"completions": _complete, "chat": _chat}
CASES = [(kind, stream) for kind in CALLS for stream in (False, True)]


@pytest.fixture(scope="module")
def expected(trio) -> dict[str, str]:
    baseline = trio[0]
    return {kind: call(baseline, False, 6) for kind, call in CALLS.items()}


@pytest.mark.parametrize(("kind", "stream"), CASES)
def test_baseline(trio, expected, kind, stream):
    text = CALLS[kind](trio[0], stream, 6)
    assert text == expected[kind] and len(text.split()) == 6


@pytest.mark.parametrize(("kind", "stream"), CASES)
def test_prefill_max_tokens_1(trio, expected, kind, stream):
    prefill, decode = trio[1], trio[2]
    rid = f"oa-prefill-{kind}-{stream}"
    text = CALLS[kind](prefill, stream, 1, rid)
    assert text == " " + expected[kind].split()[0]
    CALLS[kind](decode, False, 1, rid)  # pull it, so the producer's slot is not left pinned


def test_prefill_accepts_more_than_one_token(trio, expected):
    """As vLLM: a producer generates them all (test_neuron_semantics has the details)."""
    prefill, decode = trio[1], trio[2]
    assert _complete(prefill, False, 5, "oa-five") == " " + " ".join(
        expected["completions"].split()[:5]
    )
    _complete(decode, False, 1, "oa-five")  # pull it, so the producer's slot is not left pinned


@pytest.mark.parametrize(("kind", "stream"), CASES)
def test_decode_paired_with_prefill(trio, expected, kind, stream):
    _, prefill, decode = trio
    rid = f"oa-pair-{kind}-{stream}"
    call = CALLS[kind]
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        p = pool.submit(call, prefill, stream, 1, rid)
        text = call(decode, stream, 6, rid)
        first: Any = p.result()
    assert text == expected[kind]
    assert first == " " + text.split()[0]


def test_models_and_errors_through_the_client(trio):
    client = _client(trio[0])
    assert [m.id for m in client.models.list()] == [MODEL]
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="x", max_tokens=9000)
