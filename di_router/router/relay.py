"""Token-exact merge of the prefill and decode streams into one OpenAI stream.

Decode repeats prefill's token as its own first output, so per choice index exactly that chunk
is dropped (keeping a `finish_reason` it carries), decode's chat role chunk is dropped (prefill
already sent it with the first token), prefill's `finish_reason` is cleared (its "length" is an
artefact of max_tokens=1) and its usage chunk is kept from the client.

Every event is parsed (a malformed one must end the stream with an error, not reach the
client), but decode's events are re-serialised only when something in them changes: the
upstream `X-Request-Id` is the router's own hex id, so vLLM's `cmpl-<id>` already is the
client's id, and `created` differs only across a second boundary.
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
    """A stream chunk, or UpstreamError for an in-stream error event or a malformed chunk."""
    try:
        chunk = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise UpstreamError.make(
            role, 502, "bad_response", f"{role} server sent an event that is not JSON"
        ) from None
    if not isinstance(chunk, dict):
        raise UpstreamError.make(role, 502, "bad_response", f"{role} server sent a malformed event")
    if "error" in chunk:
        error = chunk["error"]
        code = error.get("code") if isinstance(error, dict) else None
        status = code if isinstance(code, int) and 400 <= code <= 599 else 502
        body = error if isinstance(error, dict) else error_body(status, str(error))
        raise UpstreamError(role, status, "stream_error", body)
    choices = chunk.get("choices")
    if not isinstance(choices, list):
        raise UpstreamError.make(role, 502, "bad_response", f"{role} server sent a malformed event")
    for choice in choices:
        if not isinstance(choice, dict):
            raise UpstreamError.make(
                role, 502, "bad_response", f"{role} server sent a malformed event"
            )
    return chunk


class StreamMerger:
    """Turns upstream chunks into client SSE events; holds the per-index dedup state."""

    def __init__(
        self, trace: RequestTrace, client_id: str, created: int, chat: bool, choices: int
    ) -> None:
        self.trace = trace
        self._choices = choices
        self._first_tokens: set[int] = set()
        """Choice indices whose first token (from prefill) was merged."""
        self._id = client_id
        self._created = created
        self._chat = chat
        self._repeated: set[int] = set()
        self._verbatim: bool | None = None
        """Whether decode's chunks already carry the client's id and `created`."""

    def prefill(self, data: bytes) -> bytes:
        chunk = parse_chunk("prefill", data)
        choices = chunk["choices"]
        if not choices:
            self._note_usage(chunk)
            return b""
        if self.trace.prefill_done is None:
            self.trace.prefill_done = time.perf_counter()
        for choice in choices:
            if not self._is_role_chunk(choice):
                self._first_tokens.add(choice.get("index", 0))
            choice["finish_reason"] = None
            if self._chat:
                choice.pop("stop_reason", None)  # vLLM puts it on a chat stream's last chunk only
            elif "stop_reason" in choice:
                choice["stop_reason"] = None
        return self._rewritten(chunk, sum(not self._is_role_chunk(c) for c in choices))

    @property
    def has_first_tokens(self) -> bool:
        """The first token of every choice (one per prompt) is in."""
        return len(self._first_tokens) >= self._choices

    def decode(self, data: bytes) -> bytes:
        chunk = parse_chunk("decode", data)
        choices = chunk["choices"]
        if self._verbatim is None:
            self._verbatim = chunk.get("id") == self._id and chunk.get("created") == self._created
        if not choices:  # the usage chunk the client asked for: decode's numbers are the truth
            self._note_usage(chunk)
            return self._event(data, chunk, 0)
        if self._all_repeated(choices):
            return self._event(data, chunk, len(choices))  # the common case: tokens, as sent
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
            return b""
        chunk["choices"] = kept
        return self._rewritten(chunk, tokens)

    def relay(self, data: bytes) -> bytes:
        """A decode that produces every token itself (vLLM V1 NIXL): its events pass as they
        are (re-serialised only if id or `created` differ)."""
        chunk = parse_chunk("decode", data)
        choices = chunk["choices"]
        if self._verbatim is None:
            self._verbatim = chunk.get("id") == self._id and chunk.get("created") == self._created
        if not choices:
            self._note_usage(chunk)
        tokens = 0
        for choice in choices:
            if not self._is_role_chunk(choice):
                self._first_tokens.add(choice.get("index", 0))
                tokens += 1
        return self._event(data, chunk, tokens)

    def _all_repeated(self, choices: list[dict[str, Any]]) -> bool:
        """Every choice is a token past its index's repeated first one (and no role chunk)."""
        for choice in choices:
            if choice.get("index", 0) not in self._repeated or self._is_role_chunk(choice):
                return False
        return True

    def _event(self, data: bytes, chunk: dict[str, Any], tokens: int) -> bytes:
        if not self._verbatim:
            return self._rewritten(chunk, tokens)
        self._count(tokens)
        return encode_event(data)

    def _rewritten(self, chunk: dict[str, Any], tokens: int) -> bytes:
        chunk["id"] = self._id
        chunk["created"] = self._created
        self._count(tokens)
        return encode_event(orjson.dumps(chunk))

    def _count(self, tokens: int) -> None:
        if tokens:
            trace = self.trace
            trace.completion_tokens += tokens
            now = time.perf_counter()
            if trace.first_token_sent is not None and trace.decode_first_token is None:
                trace.decode_first_token = now
            trace.token_sent(now)

    def _is_role_chunk(self, choice: dict[str, Any]) -> bool:
        return self._chat and "role" in (choice.get("delta") or {})

    def _note_usage(self, chunk: dict[str, Any]) -> None:
        usage = chunk.get("usage")
        if isinstance(usage, dict) and isinstance(usage.get("prompt_tokens"), int):
            self.trace.prompt_tokens = usage["prompt_tokens"]

    def _blanked(self, choice: dict[str, Any]) -> dict[str, Any]:
        """The repeated first token's chunk without the token: only its finish_reason remains."""
        if self._chat:
            choice["delta"] = {"content": ""}
        else:
            choice["text"] = ""
        choice["logprobs"] = None
        return choice
