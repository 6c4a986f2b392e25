"""The `openai` package, as users run it, sees the same answers through the router as direct."""

from __future__ import annotations

import itertools
from typing import Any

import openai
import pytest

from tests.eos_prompts import eos_first_prompt
from tests.support import MODEL, di_stack

EOS_P = 0.03
GREEDY = {"temperature": 0}


@pytest.fixture(scope="module")
def stack():
    with di_stack(sim_extra=["--sim-eos-probability", str(EOS_P)], baseline=True) as s:
        yield s


def _client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="mock_key", max_retries=0, timeout=30)


def _run(
    client: openai.OpenAI, chat: bool, stream: bool, usage: bool, max_tokens: int, text: str
) -> dict[str, Any]:
    extra: dict[str, Any] = {"stream_options": {"include_usage": True}} if usage else {}
    if chat:
        kwargs = {
            "model": MODEL,
            "messages": [{"role": "user", "content": text}],
            "max_tokens": max_tokens,
            **GREEDY,
            **extra,
        }
        if not stream:
            r = client.chat.completions.create(**kwargs)
            return {
                "text": r.choices[0].message.content,
                "finish": r.choices[0].finish_reason,
                "usage": r.usage.model_dump(exclude_none=True),
                "id": r.id[:9],
            }
        content, finish, usage_seen, ids = "", None, None, set()
        for chunk in client.chat.completions.create(stream=True, **kwargs):
            ids.add(chunk.id)
            if chunk.usage:
                usage_seen = chunk.usage.model_dump(exclude_none=True)
            for choice in chunk.choices:
                content += choice.delta.content or ""
                finish = choice.finish_reason or finish
        assert len(ids) == 1
        return {"text": content, "finish": finish, "usage": usage_seen, "id": ids.pop()[:9]}
    kwargs = {"model": MODEL, "prompt": text, "max_tokens": max_tokens, **GREEDY, **extra}
    if not stream:
        r = client.completions.create(**kwargs)
        return {
            "text": r.choices[0].text,
            "finish": r.choices[0].finish_reason,
            "usage": r.usage.model_dump(exclude_none=True),
            "id": r.id[:5],
        }
    content, finish, usage_seen, ids = "", None, None, set()
    for chunk in client.completions.create(stream=True, **kwargs):
        ids.add(chunk.id)
        if chunk.usage:
            usage_seen = chunk.usage.model_dump(exclude_none=True)
        for choice in chunk.choices:
            content += choice.text
            finish = choice.finish_reason or finish
    assert len(ids) == 1
    return {"text": content, "finish": finish, "usage": usage_seen, "id": ids.pop()[:5]}


CASES = [
    (chat, stream, usage, max_tokens, eos)
    for chat, stream, usage, max_tokens, eos in itertools.product(
        (False, True), (True, False), (False, True), (1, 50), (False, True)
    )
    if stream or not usage
]


@pytest.mark.parametrize(
    ("chat", "stream", "usage", "max_tokens", "eos"), CASES, ids=lambda v: str(v)
)
def test_sdk_through_router_equals_direct(stack, chat, stream, usage, max_tokens, eos):
    text = eos_first_prompt(chat, GREEDY, EOS_P) if eos else "write a haiku about trains"
    direct = _run(_client(stack.baseline.url), chat, stream, usage, max_tokens, text)
    routed = _run(_client(stack.router.url), chat, stream, usage, max_tokens, text)
    assert routed == direct
    if eos:
        assert routed["finish"] == "stop"


def test_sdk_sees_upstream_error_as_exception(stack):
    with pytest.raises(openai.NotFoundError) as info:
        _client(stack.router.url).completions.create(
            model="no-such-model", prompt="x", max_tokens=3
        )
    assert "no-such-model" in str(info.value)


def test_sdk_lists_models(stack):
    assert [m.id for m in _client(stack.router.url).models.list()] == [MODEL]
