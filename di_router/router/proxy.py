"""Serving one client request: validate, dispatch both legs at once, answer or stream.

An `Exchange` owns everything a request holds (its legs, its trace, the in-flight gauge) and
releases it exactly once, whether the request ends normally, fails, or the client goes away.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import orjson
from quart import Response, request
from werkzeug.exceptions import HTTPException

from di_router.router.access_log import write_access_line
from di_router.router.backends import BackendPool
from di_router.router.config import RouterConfig
from di_router.router.metrics import UNKNOWN_MODEL, RouterMetrics
from di_router.router.relay import StreamMerger, parse_chunk
from di_router.router.strategy import DIStrategy
from di_router.router.trace import Outcome, RequestTrace
from di_router.router.upstream import Leg, UpstreamError
from di_router.wire.errors import error_body, stream_error_payload
from di_router.wire.sse import DONE_EVENT, SSE_CONTENT_TYPE, encode_event

FORWARDED_HEADERS = ("traceparent", "tracestate")
T = TypeVar("T")


def json_response(body: Any, status: int = 200, request_id: str | None = None) -> Response:
    response = Response(orjson.dumps(body), status=status, content_type="application/json")
    if request_id:
        response.headers["X-Request-Id"] = request_id
    return response


class Exchange:
    def __init__(self, proxy: Proxy, trace: RequestTrace) -> None:
        self.proxy = proxy
        self.trace = trace
        self.legs: list[Leg] = []
        self._streams: list[AsyncIterator[bytes]] = []
        self._closed = False
        self._closing: asyncio.Future[None] | None = None
        self._finished = False
        proxy.metrics.in_flight.inc()

    def open_leg(self, pool: BackendPool, path: str, content: bytes, read_timeout: float) -> Leg:
        headers = {"Content-Type": "application/json", "X-Request-Id": self.trace.router_id}
        auth = request.headers.get("Authorization") or self.proxy.default_authorization
        if auth:
            headers["Authorization"] = auth
        for name in FORWARDED_HEADERS:
            if name in request.headers:
                headers[name] = request.headers[name]
        leg = Leg(pool.pick(), path, content, headers, read_timeout)
        self.legs.append(leg)
        return leg

    def track(self, stream: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        self._streams.append(stream)
        return stream

    async def aclose(self) -> None:
        """Close both legs at once: each backend sees the disconnect and aborts its request."""
        if self._closed:
            return
        self._closed = True
        for stream in self._streams:
            with contextlib.suppress(Exception):
                await stream.aclose()  # type: ignore[attr-defined]
        await asyncio.gather(*(leg.aclose() for leg in self.legs), return_exceptions=True)

    def finish(self, status: int, outcome: Outcome, error: UpstreamError | None = None) -> None:
        if self._finished:
            return
        self._finished = True
        trace = self.trace
        trace.finished = time.perf_counter()
        trace.status = status
        trace.outcome = outcome
        if error is not None:
            trace.error_role, trace.error_type = error.role, error.error_type
        proxy = self.proxy
        proxy.metrics.in_flight.dec()
        proxy.metrics.observe(trace, proxy.model_label(trace.model))
        write_access_line(trace, proxy.config.log_format == "json")

    def on_task_done(self, _: object) -> None:
        """Safety net: runs when the request's task ends however it ended."""
        self.finish(499, Outcome.CLIENT_DISCONNECT)
        if not self._closed:
            self._closing = asyncio.ensure_future(self.aclose())

    def fail(self, status: int, message: str, param: str | None = None) -> Response:
        self.finish(status, Outcome.CLIENT_ERROR)
        return json_response(error_body(status, message, param), status, self.trace.router_id)

    def upstream_failed(self, error: UpstreamError) -> Response:
        if 400 <= error.status < 500 and error.error_type.startswith("http_"):
            # The backend rejected the request itself (bad field, unknown model): not a failure.
            self.finish(error.status, Outcome.CLIENT_ERROR)
        else:
            self.finish(error.status, Outcome.UPSTREAM_ERROR, error)
        return json_response(error.body, error.status, self.trace.router_id)


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
        trace.stream = body.get("stream") is True
        problem = self.strategy.unsupported(body, chat)
        if problem is not None:
            return exchange.fail(400, problem[1], problem[0])
        cfg = self.config
        # Both legs leave now: decode must hold the request to reserve its slot early.
        prefill_content = orjson.dumps(self.strategy.prefill_body(body))
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
            prefill_body = await _unless_failed(decode, prefill.json())
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
        prefill_events = exchange.track(prefill.event_batches())
        # Nothing is sent before prefill's first event and decode's headers are in, so an
        # error on either leg still reaches the client with its own status.
        async with self._bounded_prefill(prefill):
            try:
                first = await _unless_failed(decode, anext(prefill_events))
            except StopAsyncIteration:
                raise UpstreamError.make(
                    "prefill", 502, "stream_cut", "prefill server ended its stream without a token"
                ) from None
            first_event = _merged(merger.prefill, "prefill", first)
            await decode.response()
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


async def _unless_failed(decode: Leg, step: Awaitable[T]) -> T:
    """Await a prefill step, unless the decode leg fails first: then raise decode's error now.

    A decode leg that is refused, rejected (4xx) or times out before prefill finishes makes the
    prefill result useless; waiting for it would delay the answer and, on a KV producer, pin a
    KV entry that no consumer will ever pull. The caller's cleanup closes the prefill leg.
    """
    task = asyncio.ensure_future(step)
    watch = asyncio.ensure_future(decode.settled())
    try:
        await asyncio.wait((task, watch), return_when=asyncio.FIRST_COMPLETED)
        if not task.done():
            await decode.response()  # raises UpstreamError if decode failed; else keep waiting
        return await task
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
            await asyncio.wait((task,))


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
