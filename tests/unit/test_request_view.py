"""`request_view.read_request`: the router reads the fields it acts on as vLLM's pydantic does,
and refuses token limits with vLLM's own messages (else prefill accepts what decode refuses)."""

from __future__ import annotations

from typing import Any

import pytest

from di_router.router.request_view import InvalidField, di_unsupported, read_request


@pytest.mark.parametrize(
    ("body", "streaming"),
    [({}, False), ({"stream": 1}, True), ({"stream": "true"}, True), ({"stream": 0}, False),
     ({"stream": None}, False), ({"stream": "off"}, False)],
)  # fmt: skip
def test_stream_coerced_like_vllm(body: dict[str, Any], streaming: bool) -> None:
    assert read_request(body).streaming is streaming


def test_numbers_coerced_like_vllm() -> None:
    view = read_request({"n": "1", "max_tokens": "5", "min_tokens": 2.0, "best_of": 1})
    assert (view.n, view.max_tokens, view.min_tokens) == (1, 5, 2)
    assert di_unsupported(view, chat=False) is None


def test_unknown_fields_are_ignored() -> None:
    assert read_request({"model": "m", "temperature": "hot", "whatever": [1]}).streaming is False


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"stream": "maybe"}, "stream"),
        ({"stream": 2}, "stream"),
        ({"max_tokens": 1.5}, "max_tokens"),
        ({"max_tokens": "many"}, "max_tokens"),
        ({"n": [1]}, "n"),
        ({"stream_options": 5}, "stream_options"),
        ({"stream_options": {"include_usage": "perhaps"}}, "stream_options.include_usage"),
    ],
)
def test_type_errors_name_the_field(body: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidField) as info:
        read_request(body)
    assert info.value.param == param
    assert info.value.message.startswith(f"{param}: ")


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"max_tokens": 0}, "max_tokens must be at least 1, got 0."),
        ({"max_tokens": -3}, "max_tokens must be at least 1, got -3."),
        ({"max_completion_tokens": 0, "max_tokens": 0},
         "max_tokens must be at least 1, got 0."),
        ({"min_tokens": -1}, "min_tokens must be greater than or equal to 0, got -1."),
        ({"min_tokens": 5, "max_tokens": 3},
         "min_tokens must be less than or equal to max_tokens=3, got 5."),
        ({"min_tokens": 5, "max_tokens": 10, "max_completion_tokens": 3},
         "min_tokens must be less than or equal to max_tokens=3, got 5."),
    ],
)  # fmt: skip
def test_token_limits_with_vllm_messages(body: dict[str, Any], message: str) -> None:
    """Checks across fields name no single field (the client error's `param` is null). Chat
    reads `max_completion_tokens or max_tokens`, as vLLM 0.7.2 does."""
    with pytest.raises(InvalidField) as info:
        read_request(body, chat=True)
    assert (info.value.param, info.value.message) == ("", message)


@pytest.mark.parametrize(
    "body",
    [{"min_tokens": 3, "max_tokens": 3}, {"min_tokens": 0}, {"min_tokens": 50},
     {"max_tokens": 1}, {"max_completion_tokens": 2, "max_tokens": 50, "min_tokens": 2}],
)  # fmt: skip
def test_token_limits_vllm_accepts(body: dict[str, Any]) -> None:
    read_request(body, chat=True)


def test_completions_ignore_max_completion_tokens_and_default_max_tokens_to_16() -> None:
    """vLLM 0.7.2's CompletionRequest has no `max_completion_tokens` and `max_tokens` = 16."""
    read_request({"min_tokens": 5, "max_tokens": 10, "max_completion_tokens": 3})
    with pytest.raises(InvalidField) as info:
        read_request({"min_tokens": 50})
    assert info.value.message == "min_tokens must be less than or equal to max_tokens=16, got 50."


def test_zero_max_completion_tokens_falls_back_to_max_tokens() -> None:
    assert read_request({"max_completion_tokens": 0, "max_tokens": 5}).max_tokens == 5


@pytest.mark.parametrize(
    ("prompt", "count"),
    [("one", 1), (["a", "b", "c"], 3), ([1, 2, 3], 1), ([[1, 2], [3]], 2), ([], 1), (None, 1)],
)
def test_prompt_count(prompt: Any, count: int) -> None:
    assert read_request({"prompt": prompt}).prompt_count == count


@pytest.mark.parametrize(
    ("body", "chat", "field"),
    [
        ({"n": 2}, False, "n"),
        ({"n": "3"}, True, "n"),
        ({"best_of": 2}, False, "best_of"),
        ({"use_beam_search": True}, False, "use_beam_search"),
        ({"prompt_logprobs": 1}, False, "prompt_logprobs"),
        ({"echo": True, "logprobs": 0}, False, "logprobs"),
        ({"echo": True, "logprobs": 2}, False, "logprobs"),
    ],
)
def test_unsupported_fields_are_named(body: dict[str, Any], chat: bool, field: str) -> None:
    problem = di_unsupported(read_request(body), chat)
    assert problem is not None
    assert problem[0] == field
    assert "disaggregated" in problem[1] or "decode server" in problem[1]


@pytest.mark.parametrize(
    ("body", "chat"),
    [({"n": 1}, False), ({"best_of": 1}, False), ({"echo": True}, False),
     ({"logprobs": 2}, False), ({"echo": True, "logprobs": True}, True),
     ({"use_beam_search": False}, True)],
)  # fmt: skip
def test_supported_fields_pass(body: dict[str, Any], chat: bool) -> None:
    assert di_unsupported(read_request(body), chat) is None


def test_prompt_logprobs_zero_is_unsupported() -> None:
    problem = di_unsupported(read_request({"prompt_logprobs": 0}), chat=False)
    assert problem is not None and problem[0] == "prompt_logprobs"
