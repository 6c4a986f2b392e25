"""A whole answer rebuilt from decode's stream: vLLM 0.7.2's non-streamed body, field for field."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from di_router.router.answer_from_stream import AnswerFromStream, streamable
from tests.unit.chunks import chat_chunk, completion_chunk, usage_chunk


def rebuilt(chat: bool, *chunks: dict[str, Any]) -> dict[str, Any]:
    answer = AnswerFromStream(chat)
    for chunk in chunks:
        answer.feed(orjson.dumps(chunk))
    return answer.body("cmpl-x", 7, prompt_tokens=5)


def test_a_prompt_list_keeps_each_choice_with_its_own_end() -> None:
    body = rebuilt(
        False,
        completion_chunk("r", 1, "B"),
        completion_chunk("r", 0, "A"),
        completion_chunk("r", 1, "b", "stop"),
        {**completion_chunk("r", 0, "a", "length"), "usage": None},
        usage_chunk(False, "r", 6, 4),
    )
    assert orjson.dumps(body) == orjson.dumps({
        "id": "cmpl-x", "object": "text_completion", "created": 7, "model": "test-model",
        "choices": [
            {"index": 0, "text": "Aa", "logprobs": None, "finish_reason": "length",
             "stop_reason": None, "prompt_logprobs": None},
            {"index": 1, "text": "Bb", "logprobs": None, "finish_reason": "stop",
             "stop_reason": None, "prompt_logprobs": None},
        ],
        "usage": {"prompt_tokens": 6, "total_tokens": 10, "completion_tokens": 4,
                  "prompt_tokens_details": None},
    })  # fmt: skip


def test_chat_keeps_role_reasoning_and_stop_reason() -> None:
    end = chat_chunk("r", 0, {"content": "!"}, "stop")
    end["choices"][0]["stop_reason"] = 128009
    body = rebuilt(
        True,
        chat_chunk("r", 0, {"role": "user", "content": ""}),
        chat_chunk("r", 0, {"reasoning_content": "think"}),
        chat_chunk("r", 0, {"reasoning_content": "ing"}),
        chat_chunk("r", 0, {"content": "hi"}),
        end,
        usage_chunk(True, "r", 3, 4),
    )
    assert orjson.dumps(body) == orjson.dumps({
        "id": "cmpl-x", "object": "chat.completion", "created": 7, "model": "test-model",
        "choices": [{
            "index": 0,
            "message": {"role": "user", "reasoning_content": "thinking", "content": "hi!",
                        "tool_calls": []},
            "logprobs": None, "finish_reason": "stop", "stop_reason": 128009,
        }],
        "usage": {"prompt_tokens": 3, "total_tokens": 7, "completion_tokens": 4,
                  "prompt_tokens_details": None},
        "prompt_logprobs": None,
    })  # fmt: skip


def test_without_a_usage_chunk_tokens_are_counted_and_the_prompt_is_prefills() -> None:
    body = rebuilt(
        True,
        chat_chunk("r", 0, {"role": "assistant", "content": ""}),
        chat_chunk("r", 0, {"content": "a"}),
        chat_chunk("r", 0, {"content": "b"}, "length"),
    )
    assert body["usage"] == {"prompt_tokens": 5, "total_tokens": 7, "completion_tokens": 2,
                             "prompt_tokens_details": None}  # fmt: skip


@pytest.mark.parametrize(
    ("chat", "fields", "expected"),
    [
        (False, {}, True),
        (True, {"tools": [], "tool_choice": "none"}, True),
        (False, {"logprobs": 0}, False),
        (True, {"logprobs": False, "top_logprobs": 1}, False),
        (True, {"tool_choice": "auto"}, False),
        (False, {"echo": True}, False),
        (True, {"echo": True}, True),
        (False, {"stream_options": None}, False),
    ],
)
def test_which_requests_are_rebuilt_from_a_stream(
    chat: bool, fields: dict[str, Any], expected: bool
) -> None:
    assert streamable({"model": "m", **fields}, chat) is expected
