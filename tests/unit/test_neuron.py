"""The Neuron protocol's request side (`neuron.NeuronFirstToken`): the prefill leg's body and
the fields DI cannot honour."""

from __future__ import annotations

from typing import Any

import pytest

from di_router.router.neuron import NeuronFirstToken
from di_router.router.request_view import read_request

PROTOCOL = NeuronFirstToken()


def prefill_body(body: dict[str, Any]) -> dict[str, Any]:
    return PROTOCOL.prefill_body(body, read_request(body))


def test_generation_capped_at_one_token_everything_else_kept() -> None:
    body = {"model": "m", "prompt": ["a", "b"], "max_tokens": 50, "temperature": 0.7,
            "seed": 3, "stop": ["x"], "logprobs": 2, "extra_field": {"kept": True}}  # fmt: skip
    prefill = prefill_body(body)
    assert prefill == {**body, "max_tokens": 1}
    assert body["max_tokens"] == 50  # the client's body is not touched (decode sends it)


def test_max_tokens_set_even_when_absent() -> None:
    assert prefill_body({"prompt": "p"})["max_tokens"] == 1


def test_max_completion_tokens_capped_only_where_present() -> None:
    assert prefill_body({"messages": [], "max_completion_tokens": 9})["max_completion_tokens"] == 1
    assert "max_completion_tokens" not in prefill_body({"messages": []})


@pytest.mark.parametrize(
    ("fields", "expected"),
    [({"min_tokens": 5, "max_tokens": 9}, 1), ({"min_tokens": 1}, 1), ({"min_tokens": "2"}, 1),
     ({"min_tokens": 0}, None), ({}, None)],
)  # fmt: skip
def test_min_tokens_capped_at_one_or_removed(fields: dict[str, Any], expected: int | None) -> None:
    """min_tokens >= 1 keeps "no EOS as the first token"; it must stay <= max_tokens (1)."""
    prefill = prefill_body({"prompt": "p", **fields, "min_completion_tokens": 4})
    assert prefill.get("min_tokens") == expected
    assert "min_completion_tokens" not in prefill


@pytest.mark.parametrize("stream", [True, 1, "true"])
def test_stream_options_replaced_by_usage_on_streams(stream: Any) -> None:
    """Prefill's usage chunk tells the router the prompt size; the client's options are
    decode's business."""
    body = {"prompt": "p", "stream": stream,
            "stream_options": {"include_usage": False, "continuous_usage_stats": True}}  # fmt: skip
    assert prefill_body(body)["stream_options"] == {"include_usage": True}


def test_stream_options_dropped_when_not_streaming() -> None:
    assert "stream_options" not in prefill_body({"prompt": "p", "stream_options": None})
    assert "stream_options" not in prefill_body({"prompt": "p", "stream": False})


def test_unsupported_is_the_di_check() -> None:
    assert PROTOCOL.unsupported(read_request({"n": 2}), chat=True) == (
        "n", "n > 1 is not supported with disaggregated inference",
    )  # fmt: skip
    assert PROTOCOL.unsupported(read_request({"n": 1, "echo": True}), chat=False) is None
