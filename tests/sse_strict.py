"""A strict reader of vLLM-style SSE bodies: every byte must be where the format puts it."""

from __future__ import annotations

import json
from typing import Any


class SSEFormatError(AssertionError):
    pass


def parse_sse(body: bytes) -> list[dict[str, Any]]:
    """Events of `data: <json>\\n\\n` ending with exactly one `data: [DONE]\\n\\n`.

    Fails on a missing blank separator, any other field or comment line, CRs, a second or
    missing [DONE], anything after [DONE], or a payload that is not a JSON object.
    """
    if b"\r" in body:
        raise SSEFormatError("carriage return in stream")
    if not body.endswith(b"data: [DONE]\n\n"):
        raise SSEFormatError(f"stream does not end with 'data: [DONE]\\n\\n': {body[-80:]!r}")
    events = body.split(b"\n\n")
    if events[-1] != b"":
        raise SSEFormatError("trailing bytes after the last event")
    events = events[:-1]
    payloads: list[dict[str, Any]] = []
    for i, event in enumerate(events):
        if b"\n" in event:
            raise SSEFormatError(f"event {i} has more than one line: {event!r}")
        if not event.startswith(b"data: "):
            raise SSEFormatError(f"event {i} is not a 'data: ' line: {event!r}")
        data = event[6:]
        if data == b"[DONE]":
            if i != len(events) - 1:
                raise SSEFormatError(f"[DONE] at event {i} of {len(events)}")
            continue
        obj = json.loads(data)
        if not isinstance(obj, dict):
            raise SSEFormatError(f"event {i} payload is not an object: {data!r}")
        payloads.append(obj)
    return payloads


def check_chunks(chunks: list[dict[str, Any]], chat: bool) -> None:
    """One id and one `created` for the whole stream; the right `object`; no errors."""
    errors = [c for c in chunks if "error" in c]
    if errors:
        raise SSEFormatError(f"error event in stream: {errors}")
    ids = {c["id"] for c in chunks}
    created = {c["created"] for c in chunks}
    objects = {c["object"] for c in chunks}
    prefix = "chatcmpl-" if chat else "cmpl-"
    expected_object = "chat.completion.chunk" if chat else "text_completion"
    if len(ids) != 1 or not next(iter(ids)).startswith(prefix):
        raise SSEFormatError(f"ids {ids}")
    if len(created) != 1:
        raise SSEFormatError(f"created values {created}")
    if objects != {expected_object}:
        raise SSEFormatError(f"objects {objects}")


def assemble(chunks: list[dict[str, Any]], chat: bool) -> dict[str, Any]:
    """What a client ends up with: text, finish_reason per index, role chunks, usage."""
    text: dict[int, str] = {}
    finish: dict[int, str | None] = {}
    roles: dict[int, int] = {}
    usage = None
    for chunk in chunks:
        if chunk.get("usage") and not chunk["choices"]:
            if usage is not None:
                raise SSEFormatError("two usage chunks")
            usage = chunk["usage"]
        for choice in chunk["choices"]:
            i = choice["index"]
            if i in finish and finish[i] is not None:
                raise SSEFormatError(f"choice {i} continued after its finish_reason")
            if chat:
                delta = choice["delta"]
                if "role" in delta:
                    roles[i] = roles.get(i, 0) + 1
                    if i in text:
                        raise SSEFormatError(f"role chunk for {i} after content")
                text[i] = text.get(i, "") + (delta.get("content") or "")
            else:
                text[i] = text.get(i, "") + choice["text"]
            finish[i] = choice["finish_reason"]
    if chat and any(n != 1 for n in roles.values()):
        raise SSEFormatError(f"role chunks per index: {roles}")
    return {"text": text, "finish": finish, "usage": usage}
