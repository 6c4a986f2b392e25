"""Backends that misbehave on purpose: a small aiohttp server on a real socket, run in a thread
of the test process, whose completion handler each test chooses.

The simulator is faithful to vLLM, so it never sends a 300 MB error body, an endless SSE line or
a 520; these servers do, and the router must survive them. They answer `/health` and
`/v1/models` like vLLM, so the router's health monitor counts them as up.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import orjson
from aiohttp import web

from tests.support import MODEL, free_port

Handler = Callable[[web.Request, dict[str, Any]], Awaitable[web.StreamResponse]]


def chunk(rid: str, text: str, finish: str | None = None) -> dict[str, Any]:
    """One completions stream chunk as vLLM 0.7.2 writes it."""
    choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
    return {
        "id": f"cmpl-{rid}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": MODEL,
        "choices": [{**choice, "stop_reason": None}],
    }


def event(payload: dict[str, Any] | bytes) -> bytes:
    data = payload if isinstance(payload, bytes) else orjson.dumps(payload)
    return b"data: " + data + b"\n\n"


def answer(rid: str, text: str) -> dict[str, Any]:
    """A whole non-streamed completions answer."""
    body = chunk(rid, text, "length")
    body["usage"] = {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}
    return body


async def sse(request: web.Request, parts: AsyncIterator[bytes]) -> web.StreamResponse:
    """Stream `parts` as an event stream (chunked)."""
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    async for part in parts:
        await response.write(part)
    await response.write_eof()
    return response


async def good_prefill(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
    """vLLM's prefill leg: one token (max_tokens is 1), usage, [DONE]."""
    rid = request.headers["X-Request-Id"]
    if not body.get("stream"):
        return web.json_response(answer(rid, " A"))

    async def parts() -> AsyncIterator[bytes]:
        yield event(chunk(rid, " A"))
        usage = {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}
        yield event({**chunk(rid, ""), "choices": [], "usage": usage})
        yield b"data: [DONE]\n\n"

    return await sse(request, parts())


async def good_decode(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
    """vLLM's decode leg: prefill's token again, then `max_tokens - 1` more."""
    rid = request.headers["X-Request-Id"]
    tokens = int(body.get("max_tokens") or 4)
    if not body.get("stream"):
        return web.json_response(answer(rid, " A" + " b" * (tokens - 1)))

    async def parts() -> AsyncIterator[bytes]:
        yield event(chunk(rid, " A"))
        for i in range(1, tokens):
            yield event(chunk(rid, " b", "length" if i == tokens - 1 else None))
        yield b"data: [DONE]\n\n"

    return await sse(request, parts())


class FakeBackend:
    """One backend whose completion routes run `handler` (settable between requests)."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.request_ids: list[str] = []
        """The `X-Request-Id` of every completion request, as it came."""

    async def _completion(self, request: web.Request) -> web.StreamResponse:
        self.request_ids.append(request.headers.get("X-Request-Id", ""))
        body = orjson.loads(await request.read())
        return await self.handler(request, body)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=1 << 30)
        models = {"object": "list", "data": [{"id": MODEL, "object": "model", "root": MODEL}]}

        async def health(_: web.Request) -> web.Response:
            return web.Response()

        async def list_models(_: web.Request) -> web.Response:
            return web.json_response(models)

        app.router.add_get("/health", health)
        app.router.add_get("/v1/models", list_models)
        app.router.add_post("/v1/completions", self._completion)
        app.router.add_post("/v1/chat/completions", self._completion)
        return app


@contextlib.contextmanager
def fake_backends(*backends: FakeBackend) -> Iterator[tuple[FakeBackend, ...]]:
    """Serve the backends on one event loop in a daemon thread until the block ends."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="fake-backends", daemon=True)
    thread.start()
    runners: list[web.AppRunner] = []

    async def start() -> None:
        for backend in backends:
            runner = web.AppRunner(backend.app(), handle_signals=False, shutdown_timeout=0.5)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", backend.port).start()
            runners.append(runner)

    async def stop() -> None:
        for runner in runners:
            await runner.cleanup()

    asyncio.run_coroutine_threadsafe(start(), loop).result(10)
    try:
        yield backends
    finally:
        asyncio.run_coroutine_threadsafe(stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
