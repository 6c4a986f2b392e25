"""One upstream leg: a POST to a backend whose failures all become an `UpstreamError`.

Every wait here is bounded (connect, read, whole-leg deadlines) and every leg is closed by its
owner in `finally`, so a dead or stuck backend can neither hang a client nor leak a connection.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping
from typing import Any

import httpx
import orjson

from di_router.router.backends import Backend
from di_router.wire.errors import error_body
from di_router.wire.sse import DONE_DATA, SSEDecoder

_ERROR_BODY_LIMIT = 1 << 20


class UpstreamError(Exception):
    """A leg failed; `body` is the OpenAI error body to send, `error_type` labels metrics."""

    def __init__(self, role: str, status: int, error_type: str, body: dict[str, Any]) -> None:
        super().__init__(f"{role}: {status} {error_type}")
        self.role = role
        self.status = status
        self.error_type = error_type
        self.body = body

    @classmethod
    def make(cls, role: str, status: int, error_type: str, message: str) -> UpstreamError:
        return cls(role, status, error_type, error_body(status, message))

    @property
    def message(self) -> str:
        inner = self.body.get("error", self.body)
        return str(inner.get("message", inner)) if isinstance(inner, dict) else str(inner)


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
    detail = body.get("error") if isinstance(body, dict) else raw[:500].decode(errors="replace")
    return error_body(status, str(detail) or f"upstream answered HTTP {status}")


class Leg:
    """A request in flight to one backend; headers are awaited separately from the body."""

    def __init__(
        self,
        backend: Backend,
        path: str,
        content: bytes,
        headers: Mapping[str, str],
        read_timeout: float,
    ) -> None:
        self.backend = backend
        self.role = backend.role
        self.path = path
        self.headers = headers
        client = backend.client
        timeout = client.timeout
        # A Request built directly is about 4x cheaper than client.build_request (which parses
        # and merges the URL every time); the backend keeps the parsed URL per path.
        request = httpx.Request(
            "POST",
            backend.url_for(path),
            content=content,
            headers=headers,
            extensions={"timeout": {"connect": timeout.connect, "read": read_timeout,
                                    "write": timeout.write, "pool": timeout.pool}},
        )  # fmt: skip
        self._task = asyncio.ensure_future(client.send(request, stream=True))
        self._response: httpx.Response | None = None

    async def response(self) -> httpx.Response:
        """The 200 response with its body unread, or UpstreamError (the body is read and closed)."""
        if self._response is not None:
            return self._response
        try:
            response = await self._task
        except httpx.ConnectTimeout:
            raise self._error(
                504, "connect_timeout", "did not accept a connection in time"
            ) from None
        except httpx.ConnectError as exc:
            raise self._error(502, "connect_error", f"refused the connection ({exc})") from None
        except httpx.TimeoutException:
            raise self._error(504, "timeout", "did not answer in time") from None
        except httpx.HTTPError as exc:
            raise self._error(502, "protocol_error", f"broke the connection ({exc!r})") from None
        self._response = response
        if response.status_code != 200:
            try:
                raw = await response.aread()
            except httpx.HTTPError:
                raw = b""
            finally:
                await response.aclose()
            body = normalise_error_body(response.status_code, raw[:_ERROR_BODY_LIMIT])
            raise UpstreamError(
                self.role, response.status_code, f"http_{response.status_code}", body
            )
        return response

    async def settled(self) -> None:
        """Wait until the headers are in or the request failed; never consumes nor cancels it."""
        await asyncio.wait({self._task})

    async def json(self) -> dict[str, Any]:
        response = await self.response()
        try:
            raw = await response.aread()
        except httpx.TimeoutException:
            raise self._error(504, "timeout", "stopped answering mid-response") from None
        except httpx.HTTPError as exc:
            raise self._error(502, "protocol_error", f"broke the connection ({exc!r})") from None
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise self._error(502, "bad_response", "sent a body that is not JSON") from None
        if not isinstance(body, dict):
            raise self._error(502, "bad_response", "sent JSON that is not an object")
        return body

    async def event_batches(self) -> AsyncIterator[list[bytes]]:
        """The `data` payloads of an SSE body up to `[DONE]`, batched as they arrived.

        Events that arrive together leave together (one write to the client instead of one per
        event); a cut stream is an error.
        """
        response = await self.response()
        decoder = SSEDecoder()
        done = False
        try:
            async for chunk in response.aiter_raw():
                batch = []
                for data in decoder.feed(chunk):
                    if data == DONE_DATA:
                        done = True
                    elif not done:
                        batch.append(data)
                if batch:
                    yield batch
                # After [DONE], keep reading to the end of the body (the chunked terminator
                # follows at once): a fully read response returns its connection to the pool.
        except httpx.TimeoutException:
            raise self._error(504, "timeout", "stalled mid-stream") from None
        except httpx.HTTPError as exc:
            if done:
                return
            raise self._error(502, "protocol_error", f"broke the stream ({exc!r})") from None
        if not done:
            raise self._error(502, "stream_cut", "closed the stream before [DONE]")

    async def aclose(self) -> None:
        """Close the leg: the backend sees the disconnect and aborts the request."""
        if not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, httpx.HTTPError):
                await self._task
        elif not self._task.cancelled() and self._task.exception() is None:
            await self._task.result().aclose()

    def _error(self, status: int, error_type: str, what: str) -> UpstreamError:
        return UpstreamError.make(
            self.role, status, error_type, f"{self.role} server {self.backend.url} {what}"
        )
