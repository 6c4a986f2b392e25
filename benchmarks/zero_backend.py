"""A zero-latency vLLM-shaped backend, so that a benchmark measures the router, not the server.

The simulator spends CPU of its own on every request (validation, scheduling, sampling); on a
2-core machine that hides the router's share. This server answers `/health`, `/v1/models`,
`POST /v1/completions` and `/v1/chat/completions` (streamed or not) with vLLM 0.7.2's wire format
and almost no work per token, on aiohttp's web server and uvloop.

Token `i` of every answer is `tok<i> `, whatever the prompt, so one server plays any role of the
Neuron DI protocol: as prefill it sends `tok0` (the router asks for max_tokens=1), as decode it
repeats that first token as its own first output, exactly as a Neuron decode server does, and as
baseline it answers the whole request. `X-Request-Id: <id>` gives the answer id `cmpl-<id>`
(`chatcmpl-<id>` for chat), as vLLM derives it. With `--token-delay-ms`, tokens after the first
come one batched step apart: every stream waits on one shared timer, as in a continuous-batching
decode, rather than one timer per stream.

    python benchmarks/zero_backend.py --port 8100 [--token-delay-ms 20]
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid
from typing import Any

import orjson
import uvloop
from aiohttp import web

from di_router.wire.errors import error_body
from di_router.wire.sse import DONE_EVENT, encode_event
from di_router.wire.vllm_bodies import ResponseHead, usage

MODEL = "llama-3.3-70b"
DEFAULT_MAX_TOKENS = 16


class Ticker:
    """One timer per decode step shared by every stream (thousands of streams, one timer)."""

    def __init__(self, interval_s: float) -> None:
        self._interval = interval_s
        self._next: asyncio.Future[None] | None = None

    async def step(self) -> None:
        if self._interval <= 0:
            return
        if self._next is None:
            loop = asyncio.get_running_loop()
            self._next = loop.create_future()
            loop.call_later(self._interval, self._fire, self._next)
        await self._next

    def _fire(self, future: asyncio.Future[None]) -> None:
        self._next = None
        future.set_result(None)


def _error(status: int, message: str, param: str | None = None) -> web.Response:
    return web.json_response(error_body(status, message, param), status=status, dumps=_dumps)


def _dumps(body: Any) -> str:
    return orjson.dumps(body).decode()


def _prompt_tokens(body: dict[str, Any], chat: bool) -> int:
    """The simulator's count: one token per word plus BOS."""
    if chat:
        messages = body.get("messages") or []
        text = " ".join(str(m.get("content", "")) for m in messages if isinstance(m, dict))
    else:
        text = str(body.get("prompt", ""))
    return len(text.split()) + 1


def make_app(model: str, token_delay_s: float) -> web.Application:
    ticker = Ticker(token_delay_s)

    async def health(_: web.Request) -> web.Response:
        return web.Response()

    async def models(_: web.Request) -> web.Response:
        card = {"id": model, "object": "model", "created": 0, "owned_by": "vllm", "root": model}
        return web.json_response({"object": "list", "data": [card]}, dumps=_dumps)

    async def completions(request: web.Request) -> web.StreamResponse:
        chat = request.path == "/v1/chat/completions"
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            return _error(400, "the body is not JSON")
        if not isinstance(body, dict):
            return _error(400, "the body must be a JSON object")
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        max_tokens = DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            return _error(400, "max_tokens must be a positive integer", "max_tokens")
        request_id = request.headers.get("X-Request-Id") or uuid.uuid4().hex
        prefix = "chatcmpl-" if chat else "cmpl-"
        head = ResponseHead(prefix + request_id, int(time.time()), model, chat)
        prompt_tokens = _prompt_tokens(body, chat)
        if not body.get("stream"):
            for _ in range(max_tokens - 1):
                await ticker.step()
            text = "".join(f"tok{i} " for i in range(max_tokens))
            choice = head.final_choice(0, text, "length", None)
            answer = head.response([choice], usage(prompt_tokens, max_tokens))
            return web.json_response(answer, dumps=_dumps)
        options = body.get("stream_options")
        include_usage = isinstance(options, dict) and bool(options.get("include_usage"))
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        try:
            await response.prepare(request)
            if chat:
                await response.write(_event(head.chunk([head.role_choice(0)], None)))
            for i in range(max_tokens):
                if i:
                    await ticker.step()
                finish = "length" if i == max_tokens - 1 else None
                choice = head.token_choice(0, f"tok{i} ", finish, None)
                await response.write(_event(head.chunk([choice], None)))
            if include_usage:
                await response.write(_event(head.chunk([], usage(prompt_tokens, max_tokens))))
            await response.write(DONE_EVENT)
        except ConnectionResetError:  # the client left: vLLM aborts the request
            return response
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", completions)
    return app


def _event(chunk: dict[str, Any]) -> bytes:
    return encode_event(orjson.dumps(chunk))


async def serve(host: str, port: int, model: str, token_delay_s: float, backlog: int) -> None:
    runner = web.AppRunner(make_app(model, token_delay_s), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port, backlog=backlog).start()
    print(f"zero backend on http://{host}:{port}", flush=True)
    try:
        await asyncio.Event().wait()  # until SIGTERM/SIGINT ends the process
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--model", default=MODEL)
    p.add_argument("--token-delay-ms", type=float, default=0.0, help="one decode step")
    p.add_argument("--backlog", type=int, default=4096, help="listen backlog (aiohttp's is 128)")
    args = p.parse_args(argv)
    uvloop.run(serve(args.host, args.port, args.model, args.token_delay_ms / 1e3, args.backlog))


if __name__ == "__main__":
    main()
