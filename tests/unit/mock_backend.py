"""In-process backends: an httpx transport whose answers each test scripts, with bodies that
stream on the test's cue and count how often they are closed.

A `MockBackend` replaces a `Backend.transport`; the router's legs call it through httpx's
transport interface (any transport but their own HTTP/1.1 one). Its handler gets each request
as a `Call` and returns the response (or raises an httpx error); a `Body` yields its parts in
order, waiting at each `asyncio.Event` until the test sets it, raising any exception it holds,
then ends.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import httpx
import orjson

from di_router.wire.sse import DONE_EVENT, encode_event
from tests.unit.chunks import role_chunk, token_chunk, usage_chunk

Part = bytes | asyncio.Event | BaseException


class Body(httpx.AsyncByteStream):
    """A response body the test paces; a cancelled read loses no part (like the router's own
    transport), and `closes` counts `aclose` calls."""

    def __init__(self, parts: Iterable[Part]) -> None:
        self._parts = list(parts)
        self.closes = 0

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        while self._parts:
            part = self._parts[0]
            if isinstance(part, asyncio.Event):
                await part.wait()
                self._parts.pop(0)
                continue
            self._parts.pop(0)
            if isinstance(part, BaseException):
                raise part
            return part
        raise StopAsyncIteration

    async def aclose(self) -> None:
        self.closes += 1


@dataclass
class Call:
    request: httpx.Request
    number: int
    """0 for the backend's first request, then 1, 2, ..."""

    @property
    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = orjson.loads(self.request.content)
        return body

    @property
    def request_id(self) -> str:
        return self.request.headers["x-request-id"]

    @property
    def chat(self) -> bool:
        return self.request.url.path.endswith("/chat/completions")

    @property
    def client_id(self) -> str:
        """The id vLLM derives from X-Request-Id."""
        return ("chatcmpl-" if self.chat else "cmpl-") + self.request_id

    @property
    def stream(self) -> bool:
        return bool(self.body.get("stream"))

    @property
    def include_usage(self) -> bool:
        return bool((self.body.get("stream_options") or {}).get("include_usage"))


Handler = Callable[[Call], Awaitable[httpx.Response]]


class MockBackend(httpx.AsyncBaseTransport):
    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.calls: list[Call] = []
        self.bodies: list[Body] = []
        self._arrived = asyncio.Condition()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        call = Call(request, len(self.calls))
        self.calls.append(call)
        async with self._arrived:
            self._arrived.notify_all()
        response = await self.handler(call)
        assert isinstance(response.stream, Body), "answer with respond() or sse()"
        self.bodies.append(response.stream)
        return response

    async def call(self, number: int, timeout: float = 5.0) -> Call:
        """The backend's request `number` (0-based), once it has arrived."""
        async with asyncio.timeout(timeout), self._arrived:
            await self._arrived.wait_for(lambda: len(self.calls) > number)
        return self.calls[number]


def respond(
    call: Call, status: int, body: dict[str, Any] | bytes, **headers: str
) -> httpx.Response:
    content = body if isinstance(body, bytes) else orjson.dumps(body)
    return httpx.Response(
        status,
        headers={"content-type": "application/json", **headers},
        stream=Body([content]),
        request=call.request,
    )


def sse(call: Call, parts: Iterable[Part]) -> httpx.Response:
    return httpx.Response(
        200,
        headers={"content-type": "text/event-stream"},
        stream=Body(parts),
        request=call.request,
    )


def events(*chunks: dict[str, Any]) -> list[bytes]:
    return [encode_event(orjson.dumps(c)) for c in chunks]


def prefill_stream(call: Call, token: str, prompt_tokens: int = 3) -> list[bytes]:
    """vLLM's stream for a one-token request: (chat role chunk,) the token with "length",
    the usage chunk if asked, [DONE]."""
    rid, chat = call.client_id, call.chat
    chunks = [role_chunk(rid)] if chat else []
    chunks.append(token_chunk(chat, rid, 0, token, "length"))
    if call.include_usage:
        chunks.append(usage_chunk(chat, rid, prompt_tokens, 1))
    return [*events(*chunks), DONE_EVENT]


def decode_stream(
    call: Call, tokens: str, cue: asyncio.Event | None = None, prompt_tokens: int = 3
) -> list[Part]:
    """vLLM's decode stream: (role chunk,) every token one per chunk, the first being
    prefill's repeated, the last with "length"; nothing before `cue` is set."""
    rid, chat = call.client_id, call.chat
    chunks = [role_chunk(rid)] if chat else []
    for i, token in enumerate(tokens):
        chunks.append(token_chunk(chat, rid, 0, token, "length" if i == len(tokens) - 1 else None))
    if call.include_usage:
        chunks.append(usage_chunk(chat, rid, prompt_tokens, len(tokens)))
    return [*([cue] if cue else []), *events(*chunks), DONE_EVENT]
