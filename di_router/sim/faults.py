"""Fault injection (`--sim-fault-*`): the simulator misbehaving on purpose, on the wire.

Chaos tests of a router need backends that fail the way real ones do: answer an error status,
cut a stream, hang, trickle, send broken or huge events, crash. The faults are an ASGI
middleware around the simulator's app, so a faulted request is served by the same code as a
healthy one and only its bytes are changed. When a fault cuts a response, the app sees exactly
what a client disconnect looks like (`http.disconnect` on receive, sends dropped), so the
engine aborts the request and its slot accounting stays right. Only the two generation routes
are faulted; `/health`, `/metrics`, `/sim/stats` and `/v1/models` stay clean.

Which requests are faulted is drawn from one seeded generator in arrival order, so the same
seed, rate and request sequence give the same faults in every run, whatever the fault kinds.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import os
import random
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, NoReturn

import orjson
from quart import Quart, Response, request

from di_router.wire.errors import error_body

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[..., Awaitable[None]]  # Quart's own `asgi_app` has stricter message types

log = logging.getLogger("di_router.sim.faults")

FAULTED_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})
"""Only POSTs to these are faulted: a router's health checks and metrics scrapes stay clean."""
CRASH_EXIT_CODE = 70
"""Exit status of an injected crash (EX_SOFTWARE), so a chaos run can tell it from a real one."""
_DISCONNECT: Message = {"type": "http.disconnect"}


class FaultKind(StrEnum):
    STATUS = "status"
    DROP = "drop"
    STALL_HEADERS = "stall_headers"
    STALL = "stall"
    TRICKLE = "trickle"
    MALFORMED = "malformed"
    OVERSIZED = "oversized"
    CRASH = "crash"


_AT_EVENT = frozenset(
    {FaultKind.DROP, FaultKind.STALL, FaultKind.MALFORMED, FaultKind.OVERSIZED, FaultKind.CRASH}
)
"""Faults that act on the event after `after` intact ones."""


@dataclass(frozen=True)
class FaultSettings:
    rate: float = 1.0
    seed: int = 0
    after: int = 1
    status: int | None = None
    location: str | None = None
    drop: bool = False
    stall_headers_s: float | None = None
    stall_s: float | None = None
    trickle_bytes: int | None = None
    trickle_delay_s: float = 0.05
    malformed: str | None = None
    oversized_bytes: int | None = None
    crash: bool = False
    crash_after_requests: int | None = None

    @property
    def kinds(self) -> tuple[FaultKind, ...]:
        """The faults a request can draw, in a fixed order (the seeded draws depend on it)."""
        enabled = {
            FaultKind.STATUS: self.status is not None,
            FaultKind.DROP: self.drop,
            FaultKind.STALL_HEADERS: self.stall_headers_s is not None,
            FaultKind.STALL: self.stall_s is not None,
            FaultKind.TRICKLE: self.trickle_bytes is not None,
            FaultKind.MALFORMED: self.malformed is not None,
            FaultKind.OVERSIZED: self.oversized_bytes is not None,
            FaultKind.CRASH: self.crash,
        }
        return tuple(kind for kind, on in enabled.items() if on)

    @property
    def active(self) -> bool:
        return bool(self.kinds) or self.crash_after_requests is not None

    def describe(self) -> str:
        """One line for the startup log, e.g. `status 503 at rate 0.1 (seed 0)`."""
        parts = []
        if self.kinds:
            chosen = ", ".join(self._what(kind) for kind in self.kinds)
            parts.append(f"{chosen} at rate {self.rate:g} (seed {self.seed})")
        if self.crash_after_requests is not None:
            parts.append(f"crash the process after {self.crash_after_requests} requests")
        return "; ".join(parts)

    def _what(self, kind: FaultKind) -> str:
        after = f"after {self.after} events"
        match kind:
            case FaultKind.STATUS:
                return f"status {self.status}" + (f" to {self.location}" if self.location else "")
            case FaultKind.DROP:
                return f"drop the connection {after}"
            case FaultKind.STALL_HEADERS:
                return f"stall {_seconds(self.stall_headers_s)} before the headers"
            case FaultKind.STALL:
                return f"stall {_seconds(self.stall_s)} {after}"
            case FaultKind.TRICKLE:
                return f"trickle {self.trickle_bytes} bytes every {self.trickle_delay_s:g}s"
            case FaultKind.MALFORMED:
                return f"malformed {self.malformed} {after}"
            case FaultKind.OVERSIZED:
                return f"{self.oversized_bytes}-byte event {after}"
            case FaultKind.CRASH:
                return f"crash the process {after}"


def add_fault_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group(
        "simulator fault injection",
        "Faults on /v1/completions and /v1/chat/completions only. Each request is faulted with "
        "probability --sim-fault-rate, with one of the enabled faults picked at random; the "
        "draws are seeded. 'Events' are SSE events; a non-streamed answer is one event.",
    )
    g.add_argument(
        "--sim-fault-rate",
        type=float,
        default=1.0,
        metavar="R",
        help="fraction of requests faulted (default 1)",
    )
    g.add_argument(
        "--sim-fault-seed", type=int, default=0, metavar="N", help="seed of the draws (default 0)"
    )
    g.add_argument(
        "--sim-fault-after",
        type=int,
        default=1,
        metavar="N",
        help="events sent intact before drop, stall, malformed, oversized or crash act (default 1)",
    )
    g.add_argument(
        "--sim-fault-status",
        type=int,
        metavar="CODE",
        help="answer CODE without running the request: an OpenAI error body (204 and 304: no "
        "body; 3xx: empty, with --sim-fault-location if given)",
    )
    g.add_argument("--sim-fault-location", metavar="URL", help="Location of a 3xx status fault")
    g.add_argument(
        "--sim-fault-drop", action="store_true", help="close the connection abruptly (no [DONE])"
    )
    g.add_argument(
        "--sim-fault-stall-headers",
        type=float,
        metavar="SECONDS",
        help="hold the response headers (inf: until the client leaves)",
    )
    g.add_argument(
        "--sim-fault-stall",
        type=float,
        metavar="SECONDS",
        help="stall mid-stream (inf: until the client leaves)",
    )
    g.add_argument(
        "--sim-fault-trickle", type=int, metavar="BYTES", help="send the body BYTES at a time"
    )
    g.add_argument(
        "--sim-fault-trickle-delay",
        type=float,
        default=0.05,
        metavar="SECONDS",
        help="pause between trickled pieces (default 0.05)",
    )
    g.add_argument(
        "--sim-fault-malformed",
        choices=("sse", "json"),
        help="sse: an event without its 'data: ' framing (streams only); json: its JSON cut short",
    )
    g.add_argument(
        "--sim-fault-oversized",
        type=int,
        metavar="BYTES",
        help="pad an event's JSON with whitespace to BYTES (still valid)",
    )
    g.add_argument(
        "--sim-fault-crash",
        action="store_true",
        help=f"exit the process ({CRASH_EXIT_CODE}) in place of sending an event",
    )
    g.add_argument(
        "--sim-fault-crash-after-requests",
        type=int,
        metavar="N",
        help=f"exit the process ({CRASH_EXIT_CODE}) when generation request N+1 arrives",
    )


def fault_settings(args: argparse.Namespace) -> FaultSettings:
    """Validated fault settings; ValueError names the flag at fault."""
    if not 0.0 <= args.sim_fault_rate <= 1.0:
        raise ValueError("--sim-fault-rate must be between 0 and 1")
    status = args.sim_fault_status
    if status is not None and not 200 <= status <= 599:
        raise ValueError("--sim-fault-status must be an HTTP status from 200 to 599")
    if args.sim_fault_location is not None and (status is None or status // 100 != 3):
        raise ValueError("--sim-fault-location needs a 3xx --sim-fault-status")
    minimums = {
        "after": 0,
        "stall_headers": 0,
        "stall": 0,
        "trickle": 1,
        "trickle_delay": 0,
        "oversized": 1,
        "crash_after_requests": 0,
    }
    for name, least in minimums.items():
        value = getattr(args, f"sim_fault_{name}")
        if value is not None and not value >= least:  # `not >=` also rejects NaN
            raise ValueError(f"--sim-fault-{name.replace('_', '-')} must be at least {least}")
    return FaultSettings(
        rate=args.sim_fault_rate,
        seed=args.sim_fault_seed,
        after=args.sim_fault_after,
        status=status,
        location=args.sim_fault_location,
        drop=args.sim_fault_drop,
        stall_headers_s=args.sim_fault_stall_headers,
        stall_s=args.sim_fault_stall,
        trickle_bytes=args.sim_fault_trickle,
        trickle_delay_s=args.sim_fault_trickle_delay,
        malformed=args.sim_fault_malformed,
        oversized_bytes=args.sim_fault_oversized,
        crash=args.sim_fault_crash,
        crash_after_requests=args.sim_fault_crash_after_requests,
    )


def install_faults(app: Quart, settings: FaultSettings) -> None:
    """Wrap `app` in the fault middleware and add its counts to `/sim/stats` (if any fault)."""
    if not settings.active:
        return
    injector = FaultInjector(app.asgi_app, settings)
    app.asgi_app = injector  # type: ignore[assignment,method-assign]
    log.warning("fault injection on: %s", settings.describe())

    @app.after_request
    async def _add_fault_stats(response: Response) -> Response:
        if request.path == "/sim/stats" and response.status_code == 200:
            stats = orjson.loads(await response.get_data())
            stats["faults"] = injector.stats()
            response.set_data(orjson.dumps(stats))
        return response


class FaultInjector:
    """The ASGI middleware: draws a fault per generation request and applies it."""

    def __init__(self, app: ASGIApp, settings: FaultSettings) -> None:
        self.app = app
        self.settings = settings
        self._kinds = settings.kinds
        self._rng = random.Random(settings.seed)
        self.requests = 0
        self.injected = dict.fromkeys(self._kinds, 0)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["method"] != "POST"
            or scope["path"] not in FAULTED_PATHS
        ):
            await self.app(scope, receive, send)
            return
        self.requests += 1
        limit = self.settings.crash_after_requests
        if limit is not None and self.requests > limit:
            _crash(f"generation request {self.requests} arrived")
        kind = self._draw()
        if kind is None:
            await self.app(scope, receive, send)
        elif kind is FaultKind.STATUS:
            self.count(kind)
            await self._answer_status(receive, send)
        elif kind is FaultKind.STALL_HEADERS:
            self.count(kind)
            await self._stall_then_serve(scope, receive, send)
        else:
            faulted = _FaultedResponse(self, kind, receive, send)
            await self.app(scope, faulted.receive, faulted.send)

    def count(self, kind: FaultKind) -> None:
        self.injected[kind] += 1

    def stats(self) -> dict[str, Any]:
        return {
            "active": self.settings.describe(),
            "requests": self.requests,
            "injected": {str(kind): n for kind, n in self.injected.items()},
        }

    def _draw(self) -> FaultKind | None:
        """One draw per request, so which requests are faulted depends on seed and rate only."""
        if not self._kinds:
            return None
        draw = self._rng.random()
        if draw >= self.settings.rate:
            return None
        pick = int(draw / self.settings.rate * len(self._kinds))  # uniform below the rate
        return self._kinds[min(pick, len(self._kinds) - 1)]

    async def _stall_then_serve(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Hold the request before the app sees it, like a server too busy to read it.

        The client gets no headers meanwhile; if it leaves, the app never runs, so nothing
        reaches the engine and nothing is left waiting (a stall forever ends here too).
        """
        assert self.settings.stall_headers_s is not None
        early: list[Message] = []

        async def until_gone() -> None:
            while (message := await receive())["type"] != "http.disconnect":
                early.append(message)

        gone = asyncio.ensure_future(until_gone())
        stall = asyncio.ensure_future(_stall(self.settings.stall_headers_s))
        try:
            await asyncio.wait((gone, stall), return_when=asyncio.FIRST_COMPLETED)
        finally:
            stall.cancel()
            gone.cancel()
        if gone.done() and not gone.cancelled():
            return

        async def replay() -> Message:
            return early.pop(0) if early else await receive()

        await self.app(scope, replay, send)

    async def _answer_status(self, receive: Receive, send: Send) -> None:
        """The status answer, after reading the body as a server would; the app never runs."""
        while (message := await receive())["type"] != "http.disconnect":
            if not message.get("more_body", False):
                break
        else:
            return  # the client left first
        status = self.settings.status
        assert status is not None
        headers, body = _status_response(status, self.settings.location)
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def _status_response(status: int, location: str | None) -> tuple[list[tuple[bytes, bytes]], bytes]:
    if status in (204, 304):
        return [], b""
    if status // 100 == 3:
        headers = [(b"content-length", b"0")]
        return headers + ([(b"location", location.encode())] if location else []), b""
    body = orjson.dumps(error_body(status, f"Fault injected by the simulator: HTTP {status}"))
    return [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))], body


class _FaultedResponse:
    """One response under one fault: the app's `receive` and `send`, rewritten by the fault.

    Body bytes are regrouped into whole SSE events (the simulator writes whole events, so this
    adds no delay); a non-SSE body is one event, sent when complete. A cut (`drop`) makes the
    app's `receive` return `http.disconnect` and drops its further sends, which is what a
    client disconnect looks like to it; the app then returns with the body unfinished, so the
    server closes the connection without the final chunk.
    """

    def __init__(
        self, injector: FaultInjector, kind: FaultKind, receive: Receive, send: Send
    ) -> None:
        self._injector = injector
        self._settings = injector.settings
        self._kind = kind
        self._receive = receive
        self._send = send
        self._cut = asyncio.Event()
        self._sse = False
        self._pending = bytearray()
        self._events_sent = 0
        self._trickling = False
        """A piece was sent: the next waits the trickle delay first."""

    async def receive(self) -> Message:
        if self._cut.is_set():
            return _DISCONNECT
        message = asyncio.ensure_future(self._receive())
        cut = asyncio.ensure_future(self._cut.wait())
        try:
            await asyncio.wait((message, cut), return_when=asyncio.FIRST_COMPLETED)
        finally:
            cut.cancel()
            if not message.done():
                message.cancel()
        return message.result() if message.done() and not message.cancelled() else _DISCONNECT

    async def send(self, message: Message) -> None:
        if self._cut.is_set():
            return  # a server drops what an app sends to a client that is gone
        if message["type"] == "http.response.start":
            await self._start(message)
        elif message["type"] == "http.response.body":
            await self._body(message)
        else:
            await self._send(message)

    async def _start(self, message: Message) -> None:
        headers = message.get("headers", [])
        self._sse = any(
            name.lower() == b"content-type" and value.startswith(b"text/event-stream")
            for name, value in headers
        )
        if self._kind in (FaultKind.MALFORMED, FaultKind.OVERSIZED):
            # The body changes size: drop its length, HTTP/1.1 then sends it chunked.
            kept = [(n, v) for n, v in headers if n.lower() != b"content-length"]
            message = {**message, "headers": kept}
        elif self._kind is FaultKind.TRICKLE:
            self.count()
        await self._send(message)

    async def _body(self, message: Message) -> None:
        self._pending += message.get("body", b"")
        more = message.get("more_body", False)
        for event in self._whole_events(more):
            await self._event(event)
            if self._cut.is_set():
                return
        if not more:
            await self._send({"type": "http.response.body", "body": b"", "more_body": False})

    def _whole_events(self, more: bool) -> list[bytes]:
        pending = self._pending
        events: list[bytes] = []
        start = 0
        if self._sse:
            while (end := pending.find(b"\n\n", start)) >= 0:
                events.append(bytes(pending[start : end + 2]))
                start = end + 2
            del pending[:start]
        if pending and not more:
            events.append(bytes(pending))
            pending.clear()
        return events

    async def _event(self, event: bytes) -> None:
        kind = self._kind
        if kind in _AT_EVENT and self._events_sent == self._settings.after:
            if kind is FaultKind.DROP:
                self.count()
                self._cut.set()
                return
            if kind is FaultKind.CRASH:
                _crash(f"in place of event {self._events_sent + 1} of a response")
            if kind is FaultKind.STALL:
                assert self._settings.stall_s is not None
                self.count()
                await _stall(self._settings.stall_s)
            else:
                rewritten = self._rewrite(event)
                if rewritten != event:
                    self.count()
                event = rewritten
        self._events_sent += 1
        await self._write(event)

    def _rewrite(self, event: bytes) -> bytes:
        """The malformed or oversized version of `event`."""
        prefix, suffix = (b"data: ", b"\n\n") if self._sse else (b"", b"")
        payload = event.removeprefix(prefix).removesuffix(suffix)
        if self._kind is FaultKind.MALFORMED:
            if self._settings.malformed == "sse":
                return payload + suffix  # not `data:`-framed (a JSON body has no framing)
            return prefix + payload[: len(payload) // 2] + suffix
        size = self._settings.oversized_bytes
        assert size is not None
        return prefix + payload.ljust(size) + suffix

    async def _write(self, data: bytes) -> None:
        step = self._settings.trickle_bytes
        if self._kind is not FaultKind.TRICKLE or step is None:
            await self._send({"type": "http.response.body", "body": data, "more_body": True})
            return
        for start in range(0, len(data), step):
            if self._trickling:
                await asyncio.sleep(self._settings.trickle_delay_s)
            self._trickling = True
            piece = data[start : start + step]
            await self._send({"type": "http.response.body", "body": piece, "more_body": True})

    def count(self) -> None:
        self._injector.count(self._kind)


def _seconds(value: float | None) -> str:
    return "forever" if value == math.inf else f"{value}s"


async def _stall(seconds: float) -> None:
    """Wait `seconds`; infinity waits until the request is cancelled (its client left)."""
    if math.isinf(seconds):
        await asyncio.get_running_loop().create_future()
    else:
        await asyncio.sleep(seconds)


def _crash(reason: str) -> NoReturn:
    log.error("fault injection: crashing the process (%s)", reason)
    os._exit(CRASH_EXIT_CODE)
