"""Serving one client request: validate, dispatch both legs at once, answer or stream."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import orjson
from quart import Response, request
from werkzeug.exceptions import HTTPException

from di_router.router.backends import BackendPool
from di_router.router.config import RouterConfig
from di_router.router.exchange import Exchange
from di_router.router.kv_release import release_pinned_kv
from di_router.router.metrics import UNKNOWN_MODEL, RouterMetrics
from di_router.router.relay import StreamMerger, parse_chunk
from di_router.router.request_view import InvalidField, read_request
from di_router.router.strategy import DIStrategy
from di_router.router.trace import Outcome, RequestTrace
from di_router.router.upstream import Leg, UpstreamError
from di_router.wire.errors import stream_error_payload
from di_router.wire.responses import json_response
from di_router.wire.sse import DONE_EVENT, SSE_CONTENT_TYPE, encode_event

T = TypeVar("T")


class Proxy:
    def __init__(
        self,
        config: RouterConfig,
        prefill: BackendPool,
        decode: BackendPool,
        strategy: DIStrategy,
        metrics: RouterMetrics,
    ) -> None:
        self.config = config
        self.prefill = prefill
        self.decode = decode
        self.strategy = strategy
        self.metrics = metrics
        key = os.environ.get("OPENAI_API_KEY")
        self.default_authorization = f"Bearer {key}" if key else None
        self._background: set[asyncio.Task[None]] = set()

    async def aclose(self) -> None:
        """Shutdown: stop background KV releases (the servers are going away too)."""
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)

    def _release_pinned_kv(self, exchange: Exchange, error: UpstreamError) -> None:
        """Decode answered an HTTP error, so it never pulled prefill's KV: if prefill produces
        (or produced) its token, its entry would pin a slot forever. Pull it in the background."""
        decode = exchange.legs.get("decode")
        if (
            error.role != "decode"
            or not error.error_type.startswith("http_")
            or decode is None
            or "prefill" not in exchange.legs
            or exchange.body is None
            or exchange.view is None
        ):
            return
        content = self.strategy.release_body(exchange.body, exchange.view)
        if content is None:
            return
        prefill, step, stream = exchange.detach_prefill()
        task = asyncio.create_task(
            release_pinned_kv(
                prefill, step, stream, decode, orjson.dumps(content),
                self.config.prefill_timeout_s, self.metrics,
            )
        )  # fmt: skip
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def model_label(self, model: str | None) -> str:
        """The request's model if a decode server serves it: labels stay bounded."""
        known = {name for b in self.decode.backends for name in b.model_names}
        return model if model in known else UNKNOWN_MODEL

    async def handle(self, endpoint: str, path: str) -> Response:
        trace = RequestTrace(
            router_id=f"cmpl-{uuid.uuid4().hex}",
            endpoint=endpoint,
            client_request_id=request.headers.get("X-Request-Id"),
        )
        exchange = Exchange(self, trace)
        task = asyncio.current_task()
        assert task is not None
        task.add_done_callback(exchange.on_task_done)
        try:
            return await self._respond(exchange, path, chat=endpoint == "chat")
        except UpstreamError as error:
            self._release_pinned_kv(exchange, error)
            await exchange.aclose()
            return exchange.upstream_failed(error)
        except BaseException:
            await exchange.aclose()
            raise

    async def _respond(self, exchange: Exchange, path: str, chat: bool) -> Response:
        try:
            raw = await request.get_data()
        except HTTPException as exc:
            # Body too large (413) or too slow (408): the app's error handler answers it; count
            # it as the client's error, not as a client that went away.
            exchange.finish(exc.code or 400, Outcome.CLIENT_ERROR)
            raise
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            return exchange.fail(400, f"The request body is not valid JSON: {exc}")
        if not isinstance(body, dict):
            return exchange.fail(400, "The request body must be a JSON object.")
        trace = exchange.trace
        trace.model = body.get("model") if isinstance(body.get("model"), str) else None
        try:
            view = read_request(body)
        except InvalidField as exc:
            return exchange.fail(400, exc.message, exc.param)
        exchange.body, exchange.view = body, view
        trace.stream = view.streaming
        problem = self.strategy.unsupported(view, chat)
        if problem is not None:
            return exchange.fail(400, problem[1], problem[0])
        cfg = self.config
        # Both legs leave now: decode must hold the request to reserve its slot early.
        prefill_content = orjson.dumps(self.strategy.prefill_body(body, view))
        prefill = exchange.open_leg(self.prefill, path, prefill_content, cfg.prefill_timeout_s)
        decode = exchange.open_leg(self.decode, path, raw, cfg.decode_timeout_s)
        hex_id = trace.router_id.removeprefix("cmpl-")
        client_id = f"chatcmpl-{hex_id}" if chat else trace.router_id
        created = int(time.time())
        if trace.stream:
            return await self._stream(exchange, prefill, decode, client_id, created, chat)
        return await self._unary(exchange, prefill, decode, client_id, created)

    async def _unary(
        self, exchange: Exchange, prefill: Leg, decode: Leg, client_id: str, created: int
    ) -> Response:
        trace = exchange.trace
        async with self._bounded_prefill(prefill):
            exchange.prefill_step = asyncio.ensure_future(prefill.json())
            prefill_body = await _unless_failed(decode, exchange.prefill_step)
        trace.prefill_done = time.perf_counter()
        body = await decode.json()
        await exchange.aclose()
        body["id"] = client_id
        body["created"] = created
        usage = body.get("usage") or prefill_body.get("usage") or {}
        if isinstance(usage.get("prompt_tokens"), int):
            trace.prompt_tokens = usage["prompt_tokens"]
        if isinstance(usage.get("completion_tokens"), int):
            trace.completion_tokens = usage["completion_tokens"]
        exchange.finish(200, Outcome.OK)
        return json_response(body, 200, trace.router_id)

    def _bounded_prefill(self, prefill: Leg) -> contextlib.AbstractAsyncContextManager[None]:
        return _deadline(self.config.prefill_timeout_s, prefill, "produce the first token")

    async def _stream(
        self,
        exchange: Exchange,
        prefill: Leg,
        decode: Leg,
        client_id: str,
        created: int,
        chat: bool,
    ) -> Response:
        trace = exchange.trace
        merger = StreamMerger(trace, client_id, created, chat)
        prefill_events = exchange.prefill_stream = prefill.event_batches()
        # Nothing is sent before prefill's first event and decode's headers are in, so an
        # error on either leg still reaches the client with its own status.
        async with self._bounded_prefill(prefill):
            try:
                exchange.prefill_step = asyncio.ensure_future(anext(prefill_events))
                first = await _unless_failed(decode, exchange.prefill_step)
            except StopAsyncIteration:
                raise UpstreamError.make(
                    "prefill", 502, "stream_cut", "prefill server ended its stream without a token"
                ) from None
            first_event = _merged(merger.prefill, "prefill", first)
        await decode.response()  # bounded by the decode leg's own read timeout
        body = self._relay(exchange, merger, first_event, prefill_events, decode)
        response = Response(body, content_type=SSE_CONTENT_TYPE)
        response.timeout = None  # Quart's default would silently cut streams after 60 s
        response.headers["X-Request-Id"] = trace.router_id
        response.headers["Cache-Control"] = "no-cache"
        return response

    async def _relay(
        self,
        exchange: Exchange,
        merger: StreamMerger,
        first_event: bytes,
        prefill_events: AsyncIterator[list[bytes]],
        decode: Leg,
    ) -> AsyncIterator[bytes]:
        status, outcome, error = 200, Outcome.OK, None
        try:
            if first_event:
                yield first_event
            async for batch in prefill_events:
                if events := _merged(merger.prefill, "prefill", batch):
                    yield events
            async for batch in decode.event_batches():
                if events := _merged(merger.decode, "decode", batch):
                    yield events
            yield DONE_EVENT
        except UpstreamError as exc:
            # Headers are gone: say what failed in the stream, then end it properly.
            outcome, error = Outcome.UPSTREAM_ERROR, exc
            message = f"{exc.role} failed mid-stream: {exc.message}"
            yield encode_event(orjson.dumps(stream_error_payload(exc.status, message)))
            yield DONE_EVENT
        except (asyncio.CancelledError, GeneratorExit):
            status, outcome = 499, Outcome.CLIENT_DISCONNECT
            raise
        finally:
            await exchange.aclose()
            exchange.finish(status, outcome, error)


def _merged(
    merge: Callable[[dict[str, Any]], bytes | None], role: str, batch: list[bytes]
) -> bytes:
    """The client events for one batch of upstream payloads, as one write."""
    return b"".join(event for data in batch if (event := merge(parse_chunk(role, data))))


async def _unless_failed(decode: Leg, step: asyncio.Task[T]) -> T:
    """Await a prefill step, unless the decode leg fails first: then raise decode's error now.

    A decode leg that is refused, rejected (4xx) or times out before prefill finishes makes
    waiting for prefill pointless: the client gets decode's error at once. The step is left
    running; its owner (the exchange, or a KV release) decides what happens to it.
    """
    watch = asyncio.ensure_future(decode.settled())
    try:
        await asyncio.wait((step, watch), return_when=asyncio.FIRST_COMPLETED)
        if not step.done():
            await decode.response()  # raises UpstreamError if decode failed; else keep waiting
        return await asyncio.shield(step)
    finally:
        watch.cancel()


@contextlib.asynccontextmanager
async def _deadline(seconds: float, leg: Leg, what: str) -> AsyncIterator[None]:
    try:
        async with asyncio.timeout(seconds):
            yield
    except TimeoutError:
        raise UpstreamError.make(
            leg.role,
            504,
            "timeout",
            f"{leg.role} server {leg.backend.url} did not {what} within {seconds:g}s",
        ) from None
