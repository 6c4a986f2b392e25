"""One completion request, from the route to the last byte.

    read the body -> validate -> the protocol builds an exchange on a pair of backends
    (`exchange.py`) -> up to the first token (another pair if it could not even connect) ->
    answer: stream the events as they come, or the whole JSON body -> the settler takes the
    exchange -> record.

The answer ends when the client has it or has gone; what the exchange's servers still need to
get their slots back (on Neuron, a cut leg can hold one for good) happens in the settler, in
the background, so the client and the metrics never wait for it.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import TYPE_CHECKING

import orjson

from di_router.router.backends import Backend, NoBackends
from di_router.router.client import DISCONNECTED, BodyError, Client, ClientGone
from di_router.router.exchange import Exchange, ExchangeSpec
from di_router.router.request_view import InvalidField, read_request
from di_router.router.trace import Outcome, RequestTrace
from di_router.router.upstream import UpstreamError
from di_router.wire.errors import error_body, stream_error_payload
from di_router.wire.sse import DONE_EVENT, encode_event

if TYPE_CHECKING:
    from di_router.router.service import RouterService

log = logging.getLogger("di_router.request")

SHUTDOWN = "router shutting down"
"""The cancellation message of a request ended by the drain timeout."""

_SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
]
_PREFILL_TAIL_S = 1.0
"""How long a finished request waits for prefill's usage chunk before it is recorded."""


class Completion:
    """One client request to /v1/completions or /v1/chat/completions."""

    def __init__(self, service: RouterService, client: Client, chat: bool) -> None:
        self.service = service
        self.client = client
        self.chat = chat
        self.hex_id = uuid.uuid4().hex
        self.trace = RequestTrace(
            router_id=f"cmpl-{self.hex_id}",
            endpoint="chat" if chat else "completions",
            client_request_id=client.headers.get("x-request-id"),
        )
        self.exchange: Exchange | None = None
        self.error: UpstreamError | None = None

    async def run(self) -> None:
        service, client = self.service, self.client
        config = service.config
        status, outcome = 200, Outcome.OK
        task = asyncio.current_task()
        assert task is not None
        try:
            try:
                held = [await client.read_body(config.max_body_bytes, config.body_timeout_s)]
            except BodyError as exc:
                status, outcome = await self._reject(exc.status, exc.message), Outcome.CLIENT_ERROR
                return
            client.watch_disconnect(task)
            status, outcome = await self._serve(held)
        except ClientGone:
            status, outcome = 499, Outcome.CLIENT_DISCONNECT
        except UpstreamError as exc:
            status, outcome = await self._upstream_failed(exc)
        except asyncio.CancelledError as exc:
            reason = exc.args[0] if exc.args else None
            if reason not in (DISCONNECTED, SHUTDOWN):
                raise
            task.uncancel()
            if reason == DISCONNECTED or client.gone:
                status, outcome = 499, Outcome.CLIENT_DISCONNECT
            else:
                status, outcome = await self._shut_down()
        finally:
            client.stop_watching()
            self._hand_over_legs(status, outcome)
            await self._record(status, outcome)

    async def _serve(self, held: list[bytes]) -> tuple[int, Outcome]:
        """`held` hands over the only reference to the body, so that it can be let go of once
        each leg has its own bytes."""
        service, trace = self.service, self.trace
        raw = held.pop()
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            return await self._reject(400, f"The request body is not valid JSON: {exc}"), (
                Outcome.CLIENT_ERROR
            )
        if not isinstance(body, dict):
            return await self._reject(400, "The request body must be a JSON object."), (
                Outcome.CLIENT_ERROR
            )
        model = body.get("model")
        trace.model = model if isinstance(model, str) else None
        try:
            view = read_request(body, self.chat)
        except InvalidField as exc:
            return await self._reject(400, exc.message, exc.param or None), Outcome.CLIENT_ERROR
        trace.stream = view.streaming
        protocol = service.protocol
        problem = protocol.unsupported(view, self.chat)
        if problem is not None:
            return await self._reject(400, problem[1], problem[0]), Outcome.CLIENT_ERROR
        try:
            prefill_content = orjson.dumps(protocol.prefill_body(body, view))
            streamed = None if view.streaming else protocol.streamed_decode_body(body, self.chat)
            decode_content = raw if streamed is None else orjson.dumps(streamed)
        except orjson.JSONEncodeError:  # nesting deeper than the encoder allows
            return await self._reject(400, "The request body is nested too deeply."), (
                Outcome.CLIENT_ERROR
            )
        decode_streamed = view.streaming or streamed is not None
        del body, raw, streamed  # held once: from here on only the bytes each leg sends
        exchange = await self._dispatch(
            prefill_content, decode_content, decode_streamed, view.prompt_count
        )
        if trace.stream:
            return await self._stream(exchange)
        body = await exchange.answer()
        await self.client.respond(200, orjson.dumps(body), self._id_header())
        return 200, Outcome.OK

    async def _dispatch(
        self, prefill_content: bytes, decode_content: bytes, decode_streamed: bool, choices: int
    ) -> Exchange:
        """An exchange up to its first token. One whose backends could not even be connected
        to is settled, and the request goes to another pair under a new id: nothing was sent."""
        service, trace = self.service, self.trace
        config = service.config
        created = int(time.time())
        path = "/v1/chat/completions" if self.chat else "/v1/completions"
        tried: set[Backend] = set()
        while True:
            try:
                prefill, decode = service.selection.pick(tried)
            except NoBackends as exc:
                raise UpstreamError.make(exc.role, 503, "no_backend", str(exc)) from None
            self.exchange = exchange = service.protocol.exchange(
                ExchangeSpec(
                    path=path,
                    prefill_content=prefill_content,
                    decode_content=decode_content,
                    decode_streamed=decode_streamed,
                    stream=trace.stream,
                    chat=self.chat,
                    choices=choices,
                    client_id=f"chatcmpl-{self.hex_id}" if self.chat else trace.router_id,
                    created=created,
                    trace=trace,
                    prefill=prefill,
                    decode=decode,
                    open_leg=service.leg_opener(
                        self.client, self.hex_id, path, trace.stream, (prefill, decode)
                    ),
                    prefill_timeout=config.prefill_timeout_s,
                    decode_timeout=config.decode_timeout_s,
                    max_response_bytes=config.max_response_bytes,
                )
            )
            try:
                await exchange.start()
                return exchange
            except UpstreamError as exc:
                tried.add(exchange.failed_backend(exc))
                if not exc.never_arrived or trace.completion_tokens or not service.has_other(tried):
                    raise
                log.info("%s: %s, trying another pair", trace.router_id, exc.message)
            exchange.detach(RequestTrace(router_id=trace.router_id, endpoint=trace.endpoint))
            trace.forget_tokens()
            service.settler.take(exchange, clean=False)
            self.hex_id = uuid.uuid4().hex
            trace.router_id = f"cmpl-{self.hex_id}"

    async def _stream(self, exchange: Exchange) -> tuple[int, Outcome]:
        client = self.client
        await client.start(200, [*_SSE_HEADERS, (b"x-request-id", self.trace.router_id.encode())])
        try:
            async for events in exchange.events():
                await client.write(events)
        except UpstreamError as exc:
            # Headers are gone: say what failed in the stream, then end it properly.
            self.error = exc
            self.service.log_upstream_error(exc, self.trace)
            message = f"{exc.role} failed mid-stream: {exc.message}"
            payload = stream_error_payload(exc.status, message)
            await client.write(encode_event(orjson.dumps(payload)))
            await client.write(DONE_EVENT, last=True)
            return 200, Outcome.UPSTREAM_ERROR
        await client.write(DONE_EVENT, last=True)
        return 200, Outcome.OK

    def _id_header(self) -> list[tuple[bytes, bytes]]:
        return [(b"x-request-id", self.trace.router_id.encode())]

    async def _reject(self, status: int, message: str, param: str | None = None) -> int:
        body = orjson.dumps(error_body(status, message, param))
        await self.client.respond(status, body, self._id_header())
        return status

    async def _upstream_failed(self, error: UpstreamError) -> tuple[int, Outcome]:
        self.error = error
        self.service.log_upstream_error(error, self.trace)
        body = self.service.client_error_body(error)
        await self.client.respond(error.status, orjson.dumps(body), self._id_header())
        if 400 <= error.status < 500 and error.error_type.startswith("http_"):
            # The backend rejected the request itself (bad field, unknown model): not a failure.
            self.error = None
            return error.status, Outcome.CLIENT_ERROR
        return error.status, Outcome.UPSTREAM_ERROR

    async def _shut_down(self) -> tuple[int, Outcome]:
        """The drain timeout ran out: end the answer properly, whatever state it is in."""
        message = "The router is shutting down; the request was not finished."
        if not self.client.started:
            await self._reject(503, message)
        elif not self.client.completed:
            await self.client.write(encode_event(orjson.dumps(stream_error_payload(503, message))))
            await self.client.write(DONE_EVENT, last=True)
        return 503, Outcome.UPSTREAM_ERROR

    def _hand_over_legs(self, status: int, outcome: Outcome) -> None:
        exchange = self.exchange
        if exchange is not None:
            self.service.settler.take(exchange, outcome is Outcome.OK and exchange.clean)

    async def _record(self, status: int, outcome: Outcome) -> None:
        trace = self.trace
        if self.exchange is not None and outcome is Outcome.OK:
            await self.exchange.tail(_PREFILL_TAIL_S)
        trace.finished = time.perf_counter()
        trace.status, trace.outcome = status, outcome
        if self.error is not None:
            trace.error_role, trace.error_type = self.error.role, self.error.error_type
        self.service.recorder.finished(trace)
