"""Stream chunks and answers shaped as vLLM 0.7.2 writes them, for completions and chat."""

from __future__ import annotations

from typing import Any

import orjson

from di_router.wire.sse import SSEDecoder

MODEL = "test-model"
CREATED = 1_700_000_000


def completion_chunk(
    rid: str, index: int, text: str, finish: str | None = None, created: int = CREATED
) -> dict[str, Any]:
    choice = {"index": index, "text": text, "logprobs": None, "finish_reason": finish}
    return {
        "id": rid,
        "object": "text_completion",
        "created": created,
        "model": MODEL,
        "choices": [{**choice, "stop_reason": None}],
    }


def chat_chunk(
    rid: str, index: int, delta: dict[str, Any], finish: str | None = None, created: int = CREATED
) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": index, "delta": delta, "logprobs": None}
    choice["finish_reason"] = finish
    if finish is not None:
        choice["stop_reason"] = None
    return {
        "id": rid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": MODEL,
        "choices": [choice],
    }


def token_chunk(
    chat: bool, rid: str, index: int, text: str, finish: str | None = None, created: int = CREATED
) -> dict[str, Any]:
    if chat:
        return chat_chunk(rid, index, {"content": text}, finish, created)
    return completion_chunk(rid, index, text, finish, created)


def role_chunk(rid: str, index: int = 0, created: int = CREATED) -> dict[str, Any]:
    return chat_chunk(rid, index, {"role": "assistant", "content": ""}, None, created)


def usage_chunk(
    chat: bool, rid: str, prompt: int, completion: int, created: int = CREATED
) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": created,
        "model": MODEL,
        "choices": [],
        "usage": {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        },
    }


def answer(chat: bool, rid: str, text: str, prompt: int = 3) -> dict[str, Any]:
    """A whole non-streamed answer: vLLM 0.7.2's `model_dump()`, every field in its order."""
    completion = len(text)
    choice: dict[str, Any] = {"index": 0}
    if chat:
        choice["message"] = {
            "role": "assistant", "reasoning_content": None, "content": text, "tool_calls": []
        }  # fmt: skip
    else:
        choice["text"] = text
    choice |= {"logprobs": None, "finish_reason": "length", "stop_reason": None}
    if not chat:
        choice["prompt_logprobs"] = None
    body = {
        "id": rid,
        "object": "chat.completion" if chat else "text_completion",
        "created": CREATED,
        "model": MODEL,
        "choices": [choice],
        "usage": {
            "prompt_tokens": prompt,
            "total_tokens": prompt + completion,
            "completion_tokens": completion,
            "prompt_tokens_details": None,
        },
    }
    if chat:
        body["prompt_logprobs"] = None
    return body


def data(chunk: dict[str, Any]) -> bytes:
    return orjson.dumps(chunk)


def payloads(stream: bytes) -> list[bytes]:
    """The `data` payloads of SSE bytes."""
    return SSEDecoder(len(stream) + 1).feed(stream)


def parsed(stream: bytes) -> list[dict[str, Any]]:
    return [orjson.loads(p) for p in payloads(stream) if p != b"[DONE]"]
