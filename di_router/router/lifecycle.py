"""One completion request, from the route to the last byte.

    read the body -> validate -> both legs leave at once (`Pair`) -> wait for prefill's first
    token (unless decode fails first) -> answer: stream prefill's token at once, then decode's
    tokens as they come; or the whole JSON answer -> hand the legs over -> record.

How a request ends decides what happens to its legs, because on Neuron's servers a cut leg can
hold a slot for good (a decode request waiting for KV cannot be aborted, a finished prefill
pins its KV until it is pulled): a request that ended cleanly closes its legs at once; any
other end hands the pair to the `Settler`, which finishes it in the background so that both
servers get their slots back (see `settle.py`). Prefill is never cancelled before its first
token and decode never before it has emitted.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import TYPE_CHECKING, Any

import orjson

from di_router.router.backends import Backend
from di_router.router.client import DISCONNECTED, BodyError, Client, ClientGone
from di_router.router.relay import StreamMerger
from di_router.router.request_view import InvalidField, read_request
from di_router.router.trace import Outcome, RequestTrace
from di_router.router.upstream import Leg, UpstreamError
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


class Pair:
    """The two legs of one request, and the task that reads prefill up to its first token.

    The prefill reader is a task of its own so that it outlives the client: whoever ends the
    request (the client leaving, decode failing) never cancels it.
    """

    def __init__(
        self,
        prefill: Leg,
        decode: Leg,
        stream: bool,
        merger: StreamMerger | None,
        prefill_timeout: float,
        max_response_bytes: int,
    ) -> None:
        self.prefill = prefill
        self.decode = decode
        self.stream = stream
        self.merger = merger
        self._timeout = prefill_timeout
        self._max_response_bytes = max_response_bytes
        loop = asyncio.get_running_loop()
        self.first: asyncio.Future[Any] = loop.create_future()
        """Stream: the client's first events (bytes). Not streamed: prefill's answer (dict)."""
        self.prefill_reader = asyncio.ensure_future(self._read_prefill())

    @property
    def produced(self) -> bool:
        """Prefill produced its token, so its server holds a KV entry until decode pulls it."""
        return self.first.done() and not self.first.cancelled() and not self.first.exception()

    async def _read_prefill(self) -> None:
        backend = self.prefill.backend
        try:
            async with asyncio.timeout(self._timeout):
                self.first.set_result(await self._first_token())
            backend.timeouts_in_a_row = 0
        except TimeoutError:
            backend.timeouts_in_a_row += 1
            self.first.set_exception(
                UpstreamError.make(
                    "prefill",
                    504,
                    "timeout",
                    f"prefill server did not produce the first token within {self._timeout:g}s",
                    self.prefill.backend.url,
                )
            )
            return
        except UpstreamError as exc:
            self.first.set_exception(exc)
            return
        if self.stream:  # the rest: prefill's usage chunk (the prompt size) and [DONE]
            try:
                while (batch := await self.prefill.next_events()) is not None:
                    for data in batch:
                        self._merge(data)
            except UpstreamError as exc:
                log.info("prefill stream ended badly after its token: %s", exc.detail or exc)

    async def _first_token(self) -> Any:
        if not self.stream:
            return await self.prefill.json(self._max_response_bytes)
        merger = self.merger
        assert merger is not None
        events: list[bytes] = []
        while not merger.has_first_tokens:
            batch = await self.prefill.next_events()
            if batch is None:
                raise UpstreamError.make(
                    "prefill", 502, "stream_cut", "prefill server ended its stream without a token"
                )
            events.extend(self._merge(data) for data in batch)
        return b"".join(events)

    def _merge(self, data: bytes) -> bytes:
        assert self.merger is not None
        return self.merger.prefill(data)

    def detach(self, scratch: RequestTrace) -> None:
        """The request moved on to another pair: what this one still reads counts nowhere."""
        if self.merger is not None:
            self.merger.trace = scratch

    async def first_token(self) -> Any:
        """Prefill's first token, or the first error of either leg: a decode leg that fails
        before prefill's token makes waiting for prefill pointless."""
        decode = self.decode.dispatched
        await asyncio.wait((self.first, decode), return_when=asyncio.FIRST_COMPLETED)
        if decode.done():
            await self.decode.response()  # raises decode's error, if that is what happened
        if not self.first.done():
            await asyncio.wait((self.first,))
        return self.first.result()

    async def close(self) -> None:
        await asyncio.gather(self.prefill.aclose(), self.decode.aclose())


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
        self.pair: Pair | None = None
        self.error: UpstreamError | None = None

    async def run(self) -> None:
        service, client, _trace = self.service, self.client, self.trace
        config = service.config
        status, outcome = 200, Outcome.OK
        task = asyncio.current_task()
        assert task is not None
        try:
            try:
                raw = await client.read_body(config.max_body_bytes, config.body_timeout_s)
            except BodyError as exc:
                status, outcome = await self._reject(exc.status, exc.message), Outcome.CLIENT_ERROR
                return
            client.watch_disconnect(task)
            status, outcome = await self._serve(raw)
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

    async def _serve(self, raw: bytes) -> tuple[int, Outcome]:
        service, trace = self.service, self.trace
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
            view = read_request(body)
        except InvalidField as exc:
            return await self._reject(400, exc.message, exc.param or None), Outcome.CLIENT_ERROR
        trace.stream = view.streaming
        problem = service.strategy.unsupported(view, self.chat)
        if problem is not None:
            return await self._reject(400, problem[1], problem[0]), Outcome.CLIENT_ERROR
        try:
            prefill_content = orjson.dumps(service.strategy.prefill_body(body, view))
        except orjson.JSONEncodeError:  # nesting deeper than the encoder allows
            return await self._reject(400, "The request body is nested too deeply."), (
                Outcome.CLIENT_ERROR
            )
        del body  # held once: from here on only the bytes each leg sends
        created = int(time.time())
        first = await self._dispatch(raw, prefill_content, view.prompt_count, created)
        pair = self.pair
        assert pair is not None
        if pair.merger is not None:
            return await self._stream(pair, pair.merger, first)
        return await self._unary(pair, self._client_id, created, first)

    @property
    def _client_id(self) -> str:
        return f"chatcmpl-{self.hex_id}" if self.chat else self.trace.router_id

    async def _dispatch(
        self, raw: bytes, prefill_content: bytes, choices: int, created: int
    ) -> Any:
        """Both legs leave at once (decode must hold the request to reserve its slot early);
        the result is prefill's first token. A pair that could not even be connected to is
        settled and the request goes to another, under a new id, while nothing was sent."""
        service, trace = self.service, self.trace
        config = service.config
        path = "/v1/chat/completions" if self.chat else "/v1/completions"
        tried: set[Backend] = set()
        while True:
            merger = None
            if trace.stream:
                merger = StreamMerger(trace, self._client_id, created, self.chat, choices)
            headers = service.upstream_headers(self.client, self.hex_id)
            prefill, decode = service.open_legs(
                path, prefill_content, raw, headers, trace.stream, tried
            )
            self.pair = pair = Pair(
                prefill, decode, trace.stream, merger, config.prefill_timeout_s,
                config.max_response_bytes,
            )  # fmt: skip
            try:
                return await pair.first_token()
            except UpstreamError as exc:
                failed = prefill if exc.role == "prefill" else decode
                tried.add(failed.backend)
                if not exc.never_arrived or trace.completion_tokens or not service.has_other(tried):
                    raise
                log.info("%s: %s, trying another pair", trace.router_id, exc.message)
            pair.detach(RequestTrace(router_id=trace.router_id, endpoint=trace.endpoint))
            self.service.settler.take(pair, clean=False)
            self.hex_id = uuid.uuid4().hex
            trace.router_id = f"cmpl-{self.hex_id}"

    async def _stream(self, pair: Pair, merger: StreamMerger, first: bytes) -> tuple[int, Outcome]:
        client = self.client
        # The first token goes out as soon as prefill has it, whatever decode is doing.
        await client.start(200, [*_SSE_HEADERS, (b"x-request-id", self.trace.router_id.encode())])
        await client.write(first)
        decode = pair.decode
        try:
            while (batch := await decode.next_events()) is not None:
                if events := b"".join([merger.decode(data) for data in batch]):
                    await client.write(events)
        except UpstreamError as exc:
            # Headers are gone: say what failed in the stream, then end it properly.
            self.error = exc
            self.service.log_upstream_error(exc, self.trace)
            message = f"{exc.role} failed mid-stream: {exc.message}"
            await client.write(
                encode_event(orjson.dumps(stream_error_payload(exc.status, message)))
            )
            await client.write(DONE_EVENT, last=True)
            return 200, Outcome.UPSTREAM_ERROR
        await client.write(DONE_EVENT, last=True)
        return 200, Outcome.OK

    async def _unary(
        self, pair: Pair, client_id: str, created: int, prefill_answer: dict[str, Any]
    ) -> tuple[int, Outcome]:
        config, trace = self.service.config, self.trace
        trace.prefill_done = time.perf_counter()
        try:
            async with asyncio.timeout(config.decode_timeout_s):
                body = await pair.decode.json(config.max_response_bytes)
        except TimeoutError:
            raise UpstreamError.make(
                "decode", 504, "timeout",
                f"decode server did not answer within {config.decode_timeout_s:g}s",
                pair.decode.backend.url,
            ) from None  # fmt: skip
        body["id"] = client_id
        body["created"] = created
        usage = body.get("usage") or prefill_answer.get("usage") or {}
        if isinstance(usage, dict):
            if isinstance(usage.get("prompt_tokens"), int):
                trace.prompt_tokens = usage["prompt_tokens"]
            if isinstance(usage.get("completion_tokens"), int):
                trace.completion_tokens = usage["completion_tokens"]
        await self.client.respond(200, orjson.dumps(body), self._id_header())
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
        pair = self.pair
        if pair is not None:
            clean = outcome is Outcome.OK and pair.decode.error is None
            self.service.settler.take(pair, clean)

    async def _record(self, status: int, outcome: Outcome) -> None:
        trace, pair = self.trace, self.pair
        if pair is not None and trace.stream and trace.prompt_tokens is None:
            await asyncio.wait((pair.prefill_reader,), timeout=_PREFILL_TAIL_S)
        trace.finished = time.perf_counter()
        trace.status, trace.outcome = status, outcome
        if self.error is not None:
            trace.error_role, trace.error_type = self.error.role, self.error.error_type
        self.service.recorder.finished(trace)
