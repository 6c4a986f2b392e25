"""Token-exact merge of the prefill and decode streams into one OpenAI stream.

Decode repeats prefill's token as its own first output, so per choice index exactly that chunk
is dropped (keeping a `finish_reason` it carries), decode's chat role chunk is dropped (prefill
already sent it with the first token), prefill's `finish_reason` is cleared (its "length" is an
artefact of max_tokens=1) and its usage chunk is kept from the client. Every chunk gets the
router's id and `created`.
"""

from __future__ import annotations

import time
from typing import Any

import orjson

from di_router.router.trace import RequestTrace
from di_router.router.upstream import UpstreamError
from di_router.wire.errors import error_body
from di_router.wire.sse import encode_event


def parse_chunk(role: str, data: bytes) -> dict[str, Any]:
    """A stream chunk, or UpstreamError for an in-stream error event or malformed JSON."""
    try:
        chunk = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise UpstreamError.make(
            role, 502, "bad_response", f"{role} sent a non-JSON event"
        ) from None
    if not isinstance(chunk, dict) or not isinstance(chunk.get("choices", []), list):
        raise UpstreamError.make(role, 502, "bad_response", f"{role} sent a malformed event")
    if "error" in chunk:
        error = chunk["error"]
        code = error.get("code") if isinstance(error, dict) else None
        status = code if isinstance(code, int) and 400 <= code <= 599 else 502
        body = error if isinstance(error, dict) else error_body(status, str(error))
        raise UpstreamError(role, status, "stream_error", body)
    return chunk


class StreamMerger:
    """Turns upstream chunks into client SSE events; holds the per-index dedup state."""

    def __init__(self, trace: RequestTrace, client_id: str, created: int, chat: bool) -> None:
        self._trace = trace
        self._id = client_id
        self._created = created
        self._chat = chat
        self._repeated: set[int] = set()

    def _event(self, chunk: dict[str, Any], tokens: int) -> bytes:
        chunk["id"] = self._id
        chunk["created"] = self._created
        if tokens:
            self._trace.completion_tokens += tokens
            self._trace.token_sent(time.perf_counter())
        return encode_event(orjson.dumps(chunk))

    def _is_role_chunk(self, choice: dict[str, Any]) -> bool:
        return self._chat and "role" in (choice.get("delta") or {})

    def _note_usage(self, chunk: dict[str, Any]) -> None:
        usage = chunk.get("usage")
        if isinstance(usage, dict) and isinstance(usage.get("prompt_tokens"), int):
            self._trace.prompt_tokens = usage["prompt_tokens"]

    def prefill(self, chunk: dict[str, Any]) -> bytes | None:
        choices = chunk["choices"]
        if not choices:
            self._note_usage(chunk)
            return None
        if self._trace.prefill_done is None:
            self._trace.prefill_done = time.perf_counter()
        for choice in choices:
            choice["finish_reason"] = None
            if self._chat:
                choice.pop("stop_reason", None)  # vLLM puts it on a chat stream's last chunk only
            elif "stop_reason" in choice:
                choice["stop_reason"] = None
        tokens = sum(not self._is_role_chunk(c) for c in choices)
        return self._event(chunk, tokens)

    def decode(self, chunk: dict[str, Any]) -> bytes | None:
        choices = chunk["choices"]
        if not choices:  # the usage chunk the client asked for: decode's numbers are the truth
            self._note_usage(chunk)
            return self._event(chunk, 0)
        kept: list[dict[str, Any]] = []
        tokens = 0
        for choice in choices:
            index = choice.get("index", 0)
            if self._is_role_chunk(choice):
                continue
            if index not in self._repeated:
                self._repeated.add(index)
                if choice.get("finish_reason") is not None:
                    kept.append(self._blanked(choice))
                continue
            kept.append(choice)
            tokens += 1
        if not kept:
            return None
        if tokens and self._trace.decode_first_token is None:
            self._trace.decode_first_token = time.perf_counter()
        chunk["choices"] = kept
        return self._event(chunk, tokens)

    def _blanked(self, choice: dict[str, Any]) -> dict[str, Any]:
        """The repeated first token's chunk without the token: only its finish_reason remains."""
        if self._chat:
            choice["delta"] = {"content": ""}
        else:
            choice["text"] = ""
        choice["logprobs"] = None
        return choice
