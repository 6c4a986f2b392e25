"""One upstream leg: a POST to a backend whose failures all become an `UpstreamError`.

Every read is bounded in time (connect, silence, whole-answer deadlines) and in bytes (error
bodies, events, whole answers). A leg knows how far its backend got with the request, which is
what decides, after a failure, whether a slot may still be held on that server.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import ssl
from collections.abc import AsyncIterator, Mapping
from enum import IntEnum
from typing import Any

import httpx
import orjson

from di_router.router.backends import Backend
from di_router.router.transport import Answer, Http1Body, Http1Transport
from di_router.wire.errors import error_body
from di_router.wire.sse import DONE_DATA, EventTooLarge, MalformedEvent, SSEDecoder

log = logging.getLogger("di_router.upstream")

ERROR_BODY_LIMIT = 64 * 1024
_DRAIN_AFTER_DONE_S = 1.0


class UpstreamError(Exception):
    """A leg failed; `body` is the OpenAI error body for the client, `detail` is for the log."""

    def __init__(
        self, role: str, status: int, error_type: str, body: dict[str, Any], detail: str = ""
    ) -> None:
        super().__init__(f"{role}: {status} {error_type}")
        self.role = role
        self.status = status
        self.error_type = error_type
        self.body = body
        self.detail = detail

    @classmethod
    def make(
        cls, role: str, status: int, error_type: str, message: str, detail: str = ""
    ) -> UpstreamError:
        return cls(role, status, error_type, error_body(status, message), detail)

    @property
    def message(self) -> str:
        inner = self.body.get("error", self.body)
        return str(inner.get("message", inner)) if isinstance(inner, dict) else str(inner)

    @property
    def rejected(self) -> bool:
        """The backend itself answered with an error: it holds nothing for this request."""
        return self.error_type.startswith("http_") or self.error_type == "stream_error"

    @property
    def never_arrived(self) -> bool:
        """The request never reached the backend's engine: no connection, or (found by the
        exchange) a stream that got no headers, which vLLM sends before it adds the request."""
        return self.error_type in (
            "connect_error",
            "connect_timeout",
            "no_descriptors",
            "tls_error",
            "not_admitted",
        )


def normalise_error_body(status: int, raw: bytes) -> dict[str, Any]:
    """Keep an OpenAI-format error body as is; wrap anything else so clients can parse it."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        body = None
    if isinstance(body, dict) and (
        body.get("object") == "error" or isinstance(body.get("error"), dict)
    ):
        return body
    if isinstance(body, dict):
        detail = body.get("error") or body.get("detail")  # FastAPI's own errors use "detail"
    else:
        detail = raw[:500].decode(errors="replace")
    return error_body(status, str(detail or f"upstream answered HTTP {status}"))


def _status_error(role: str, status: int, raw: bytes, location: str | None) -> UpstreamError:
    """A 4xx is the backend judging the request: it reaches the client as is. Anything else
    (5xx, 204, a redirect, 520) is the backend failing: a 502 that says so."""
    body = normalise_error_body(status, raw)
    if 400 <= status < 500:
        return UpstreamError(role, status, f"http_{status}", body)
    inner = body.get("error", body)
    said = inner.get("message") if isinstance(inner, dict) and raw.strip() else None
    what = f"{role} server failed with HTTP {status}"
    if 300 <= status < 400:
        what = f"{role} server answered with a redirect (HTTP {status})"
    elif status < 300:
        what = f"{role} server answered HTTP {status} instead of 200"
    message = f"{what}: {str(said)[:300]}" if said else what
    detail = f"Location: {location}" if location else ""
    return UpstreamError.make(role, 502, f"http_{status}", message, detail)


class Progress(IntEnum):
    """How far the backend got with the leg; failures keep the last value reached."""

    SENT = 0
    ACCEPTED = 1
    """Response headers (200) arrived."""
    EMITTED = 2
    """A first event (or the whole answer) arrived: the server is past any KV wait."""
    FINISHED = 3


class Leg:
    """A request in flight to one backend; it starts at construction."""

    def __init__(
        self,
        backend: Backend,
        path: str,
        content: bytes,
        headers: Mapping[str, str],
        read_timeout: float,
        max_event_bytes: int,
    ) -> None:
        self.backend = backend
        self.role = backend.role
        self.path = path
        self.content = content
        self.headers = headers
        self.progress = Progress.SENT
        self.error: UpstreamError | None = None
        self._max_event_bytes = max_event_bytes
        self.read_timeout = read_timeout
        connect = backend.connect_timeout
        timeout = {"connect": connect, "read": read_timeout, "write": connect, "pool": connect}
        url = backend.url_for(path)
        transport = backend.transport
        if isinstance(transport, Http1Transport):
            raw = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
            self._task = transport.send("POST", url, raw, content, timeout)
        else:  # a transport standing in for a backend (the unit tests')
            request = httpx.Request(
                "POST", url, content=content, headers=headers, extensions={"timeout": timeout}
            )
            self._task = asyncio.ensure_future(_answer_of(transport, request))
        backend.outstanding += 1
        self._counted = True
        self._answer: Answer | None = None
        self._raw: AsyncIterator[bytes] | None = None
        self._decoder: SSEDecoder | None = None

    def resend(self, read_timeout: float) -> Leg:
        """The same request again, to the same server (a rescue keeps the pairing)."""
        return Leg(
            self.backend, self.path, self.content, self.headers, read_timeout,
            self._max_event_bytes,
        )  # fmt: skip

    @property
    def dispatched(self) -> asyncio.Future[Answer]:
        """Done when headers arrived or the request failed; never awaited for its result here."""
        return self._task

    async def response(self) -> Answer:
        """The 200 answer with its body unread, or UpstreamError (the body is read and closed)."""
        if self._answer is not None:
            return self._answer
        if self.error is not None:
            raise self.error
        task = self._task
        try:
            answer = task.result() if task.done() else await asyncio.shield(task)
        except httpx.HTTPError as exc:
            error = self._fail(self._transport_error(exc))
            if error.never_arrived and self.backend.healthy:
                # Passive ejection: the next health check that succeeds readmits it.
                self.backend.healthy = False
                log.warning("%s server %s is DOWN (%s)", self.role, self.backend.url, exc)
            raise error from None
        if answer.status != 200:
            raw = await self._read_capped(answer, ERROR_BODY_LIMIT)
            await answer.aclose()
            error = _status_error(self.role, answer.status, raw, answer.header(b"location"))
            raise self._fail(error)
        self._answer = answer
        self.progress = Progress.ACCEPTED
        return answer

    async def json(self, max_bytes: int) -> dict[str, Any]:
        """The whole non-streamed answer; the caller bounds the time."""
        answer = await self.response()
        try:
            raw = await self._read_capped(answer, max_bytes + 1, strict=True)
        except httpx.HTTPError as exc:
            raise self._fail(self._transport_error(exc, "while answering")) from None
        if len(raw) > max_bytes:
            raise self._fail(self._error(502, "too_large", f"answer is larger than {max_bytes} B"))
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise self._fail(
                self._error(502, "bad_response", "sent a body that is not JSON")
            ) from None
        if not isinstance(body, dict):
            raise self._fail(self._error(502, "bad_response", "sent JSON that is not an object"))
        self.progress = Progress.FINISHED
        return body

    async def next_events(self) -> list[bytes] | None:
        """The next batch of `data` payloads as they arrived together; None after `[DONE]`.

        Safe to cancel: no byte is lost, and another task may go on reading. A stream that
        ends without `[DONE]` is an error.
        """
        if self._raw is None:
            self._raw = (await self.response()).body.__aiter__()
            self._decoder = SSEDecoder(self._max_event_bytes)
        assert self._decoder is not None
        if self.progress is Progress.FINISHED:
            return None
        while True:
            try:
                chunk = await anext(self._raw)
            except StopAsyncIteration:
                raise self._fail(
                    self._error(502, "stream_cut", "closed the stream early")
                ) from None
            except httpx.HTTPError as exc:
                raise self._fail(self._transport_error(exc, "mid-stream")) from None
            try:
                batch = self._decoder.feed(chunk)
            except EventTooLarge as exc:
                raise self._fail(self._error(502, "too_large", f"sent {exc}")) from None
            except MalformedEvent:
                raise self._fail(
                    self._error(502, "bad_response", "sent a malformed event")
                ) from None
            if not batch:
                continue
            if DONE_DATA in batch:
                batch = batch[: batch.index(DONE_DATA)]
                self.progress = Progress.FINISHED
                await self._drain_tail()
                return batch or None
            self.progress = Progress.EMITTED
            return batch

    def set_silence(self, timeout: float) -> None:
        """From now on, a silence of the server longer than `timeout` fails the leg (a leg
        opened with a longer bound: see `neuron.py`). Only once its answer's headers are in."""
        if self._answer is not None and isinstance(self._answer.body, Http1Body):
            self._answer.body.set_silence(timeout)

    async def _drain_tail(self) -> None:
        """Read what follows `[DONE]` (the chunked terminator), so the connection is reused."""
        assert self._raw is not None
        if isinstance(self._raw, Http1Body) and self._raw.complete:
            return  # the usual case: the terminator came with `[DONE]`
        with contextlib.suppress(TimeoutError, httpx.HTTPError):
            async with asyncio.timeout(_DRAIN_AFTER_DONE_S):
                async for _ in self._raw:
                    pass

    async def aclose(self) -> None:
        """Close the leg: an unfinished request is cut, and the backend sees the disconnect."""
        if self._counted:
            self._counted = False
            self.backend.outstanding -= 1
        if not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, httpx.HTTPError):
                await self._task
        elif not self._task.cancelled() and self._task.exception() is None:
            await self._task.result().aclose()

    def _fail(self, error: UpstreamError) -> UpstreamError:
        self.error = error
        return error

    def _error(self, status: int, error_type: str, what: str) -> UpstreamError:
        return UpstreamError.make(
            self.role, status, error_type, f"{self.role} server {what}", self.backend.url
        )

    def _transport_error(self, exc: httpx.HTTPError, when: str = "") -> UpstreamError:
        suffix = f" {when}" if when else ""
        detail = f"{self.backend.url}: {exc!r}"
        if isinstance(exc, httpx.ConnectTimeout):
            kind, what, status = "connect_timeout", "did not accept a connection in time", 504
        elif isinstance(exc, httpx.ConnectError):
            cause = exc.__cause__
            if isinstance(cause, ssl.SSLError):
                kind, what, status = "tls_error", "failed the TLS handshake: its certificate " \
                    "is not trusted (see --ssl-ca-file)", 502  # fmt: skip
            elif isinstance(cause, OSError) and cause.errno in (errno.EMFILE, errno.ENFILE):
                kind, what, status = "no_descriptors", "could not be reached: the router is " \
                    "out of file descriptors", 503  # fmt: skip
            else:
                kind, what, status = "connect_error", "refused the connection", 502
        elif isinstance(exc, httpx.TimeoutException):
            kind, what, status = "timeout", f"stopped answering{suffix}", 504
        else:
            kind, what, status = "protocol_error", f"broke the connection{suffix}", 502
        return UpstreamError.make(self.role, status, kind, f"{self.role} server {what}", detail)

    async def _read_capped(self, answer: Answer, limit: int, strict: bool = False) -> bytes:
        """Up to `limit` bytes of the body; the rest is never read (nor held)."""
        parts: list[bytes] = []
        size = 0
        try:
            async for chunk in answer.body:
                parts.append(chunk)
                size += len(chunk)
                if size >= limit:
                    break
        except httpx.HTTPError:
            if strict:
                raise
        return b"".join(parts)[:limit]


async def _answer_of(transport: httpx.AsyncBaseTransport, request: httpx.Request) -> Answer:
    response = await transport.handle_async_request(request)
    assert isinstance(response.stream, httpx.AsyncByteStream)
    return Answer(response.status_code, response.headers.raw, response.stream)
