"""Everything one client request holds, released exactly once however the request ends.

An `Exchange` owns the request's legs, the prefill step in flight, its trace and its place in
the in-flight gauge. Closing it closes both legs at once, so each backend sees the disconnect
and aborts; finishing it records metrics and the access line.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from quart import Response, request

from di_router.router.access_log import write_access_line
from di_router.router.backends import BackendPool
from di_router.router.request_view import RequestView
from di_router.router.trace import Outcome, RequestTrace
from di_router.router.upstream import Leg, UpstreamError
from di_router.wire.errors import error_body
from di_router.wire.responses import json_response

if TYPE_CHECKING:
    from di_router.router.proxy import Proxy

FORWARDED_HEADERS = ("traceparent", "tracestate")


class Exchange:
    def __init__(self, proxy: Proxy, trace: RequestTrace) -> None:
        self.proxy = proxy
        self.trace = trace
        self.body: dict[str, Any] | None = None
        self.view: RequestView | None = None
        self.legs: dict[str, Leg] = {}
        self.prefill_step: asyncio.Task[Any] | None = None
        """Reading prefill's answer (its JSON, or its first stream events)."""
        self.prefill_stream: AsyncIterator[list[bytes]] | None = None
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
        self.legs[pool.role] = leg
        return leg

    def detach_prefill(
        self,
    ) -> tuple[Leg, asyncio.Task[Any] | None, AsyncIterator[list[bytes]] | None]:
        """Hand the prefill leg (and what reads it) to a new owner; `aclose` leaves them alone."""
        leg = self.legs.pop("prefill")
        step, stream = self.prefill_step, self.prefill_stream
        self.prefill_step = self.prefill_stream = None
        return leg, step, stream

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        await close_prefill_reader(self.prefill_step, self.prefill_stream)
        await asyncio.gather(*(leg.aclose() for leg in self.legs.values()), return_exceptions=True)

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


async def close_prefill_reader(
    step: asyncio.Task[Any] | None, stream: AsyncIterator[list[bytes]] | None
) -> None:
    """Stop reading prefill: cancel the step first (a running generator cannot be closed)."""
    if step is not None and not step.done():
        step.cancel()
    if step is not None:
        await asyncio.wait((step,))
        if not step.cancelled():
            step.exception()  # retrieved: a failed step was already reported, or is moot now
    if stream is not None:
        with contextlib.suppress(Exception):
            await stream.aclose()  # type: ignore[attr-defined]
