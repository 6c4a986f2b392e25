"""The DI protocol seam: how one client request becomes upstream legs, in which order, how their
answers merge into the client's, and what must happen to them when the request ends badly.

The request lifecycle (`lifecycle.py`) knows nothing of prefill or decode: it validates, asks
the service for backends, has the protocol build an `Exchange`, writes what the exchange yields
and hands it to the settler at the end. Each protocol lives in its own module (`neuron.py`,
`nixl.py`).
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from di_router.router.backends import Backend
from di_router.router.request_view import RequestView
from di_router.router.trace import RequestTrace
from di_router.router.upstream import Leg, UpstreamError

if TYPE_CHECKING:
    from di_router.router.settle import Settler


class LegOpener(Protocol):
    def __call__(self, backend: Backend, content: bytes, held: bool = False) -> Leg:
        """Start a request on a backend. A `held` leg may be kept past the client's deadline
        (by the settler): its socket's silence is bounded by the settle timeout, and its
        exchange enforces the client's deadline itself."""


@dataclass(frozen=True)
class ExchangeSpec:
    """Everything an exchange is built from; `open_leg` starts a request on a backend."""

    path: str
    prefill_content: bytes
    decode_content: bytes
    """The client's body as it came, or as the protocol rewrote it to stream decode."""
    decode_streamed: bool
    """Decode answers with a stream: the client's, or one the exchange rebuilds an answer from."""
    stream: bool
    chat: bool
    choices: int
    """Choices in the answer: one per prompt of a completions prompt list."""
    client_id: str
    created: int
    trace: RequestTrace
    prefill: Backend
    decode: Backend
    open_leg: LegOpener
    prefill_timeout: float
    decode_timeout: float
    max_response_bytes: int


class Exchange(ABC):
    """One request's legs under one protocol."""

    legs: tuple[Leg, ...]

    @abstractmethod
    async def start(self) -> None:
        """Up to the first token; nothing has reached the client yet, so an `UpstreamError`
        here is answered with its own status (and a refused connection may be retried)."""

    @abstractmethod
    def events(self) -> AsyncIterator[bytes]:
        """A streamed answer: the client's SSE bytes from the first token on, without
        `[DONE]`; an `UpstreamError` ends it."""

    @abstractmethod
    async def answer(self) -> dict[str, Any]:
        """A non-streamed answer: the client's JSON body."""

    @property
    @abstractmethod
    def clean(self) -> bool:
        """Every leg ended as it should: nothing is held on any server."""

    def failed_backend(self, error: UpstreamError) -> Backend:
        return next(leg.backend for leg in self.legs if leg.role == error.role)

    def detach(self, scratch: RequestTrace) -> None:  # noqa: B027 (optional hook)
        """The request moved on to another exchange: what this one still reads counts nowhere."""

    async def tail(self, timeout: float) -> None:  # noqa: B027 (optional hook)
        """Wait (bounded) for what the record still needs after the answer (a usage chunk)."""

    async def finish(self) -> None:
        """A clean end: return every connection."""
        await asyncio.gather(*(leg.aclose() for leg in self.legs))

    async def settle(self, settler: Settler) -> None:
        """Any other end: leave no slot held on any server (bounded by the settler)."""
        await self.finish()


class DIProtocol(Protocol):
    name: str
    pairing: str
    """The pairing its servers allow: "static" (i-th with i-th) or "any"."""

    def unsupported(self, view: RequestView, chat: bool) -> tuple[str, str] | None:
        """(field, reason) for a request this protocol cannot answer exactly, else None."""

    def prefill_body(self, body: dict[str, Any], view: RequestView) -> dict[str, Any]:
        """The body the prefill leg sends."""

    def streamed_decode_body(self, body: dict[str, Any], chat: bool) -> dict[str, Any] | None:
        """A non-streamed request: the body that asks decode for a stream instead, or None to
        send decode the client's body."""

    def exchange(self, spec: ExchangeSpec) -> Exchange: ...


def first_token_body(body: dict[str, Any], view: RequestView) -> dict[str, Any]:
    """The client's request capped at its first token, for a prefill leg: everything that
    shapes that token stays; `min_tokens` >= 1 (no EOS first) is kept within the cap."""
    prefill = dict(body)
    prefill["max_tokens"] = 1
    if "max_completion_tokens" in prefill:
        prefill["max_completion_tokens"] = 1
    prefill.pop("min_tokens", None)
    if view.min_tokens is not None and view.min_tokens >= 1:
        prefill["min_tokens"] = 1
    prefill.pop("min_completion_tokens", None)
    prefill.pop("stream_options", None)
    return prefill
