"""The Neuron vLLM fork's DI protocol (what `neuron-proxy-server` speaks, Neuron 2.24).

Both legs go out at once with one shared `X-Request-Id`, from which both servers derive the
engine request id that pairs their KV; prefill returns the first token, and decode repeats it
as its own first output before continuing (`relay.StreamMerger` merges the two).

On these servers a cut leg can hold a slot for good: a decode request waiting for its KV sits
in the scheduler's `transferring` queue, which abort never scans, and its KV lookup retries
without end; a finished prefill keeps its KV, and its slot, until a decode pulls it. So an
exchange that did not end cleanly is settled by three rules:
1. Prefill is never cancelled before its first token: its reader is a task of its own that
   runs to the end (bounded by the prefill timeout), whoever ends the request.
2. A decode that may be waiting for KV (sent, not refused, not yet emitted) needs prefill's
   entry: if prefill failed, the same prefill request goes again to the same server ("rescue").
   Then decode is read until it emits (it is past `transferring`, so closing it aborts it).
3. A decode that never took the request (refused, rejected) or ended before it emitted will
   not pull prefill's entry: if prefill produced one, the router pulls it itself with a
   one-token decode request under the same id ("release").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import orjson

from di_router.router.exchange import Exchange, ExchangeSpec, first_token_body
from di_router.router.relay import StreamMerger
from di_router.router.request_view import RequestView, di_unsupported
from di_router.router.trace import RequestTrace
from di_router.router.upstream import Leg, Progress, UpstreamError

if TYPE_CHECKING:
    from di_router.router.settle import Settler

log = logging.getLogger("di_router.neuron")


class NeuronFirstToken:
    name = "neuron-first-token"
    pairing = "static"

    def unsupported(self, view: RequestView, chat: bool) -> tuple[str, str] | None:
        return di_unsupported(view, chat)

    def prefill_body(self, body: dict[str, Any], view: RequestView) -> dict[str, Any]:
        prefill = first_token_body(body, view)
        if view.streaming:
            # The router drops this usage chunk; it only tells the router the prompt size.
            prefill["stream_options"] = {"include_usage": True}
        return prefill

    def exchange(self, spec: ExchangeSpec) -> NeuronExchange:
        return NeuronExchange(spec)


class NeuronExchange(Exchange):
    def __init__(self, spec: ExchangeSpec) -> None:
        self.spec = spec
        self.merger: StreamMerger | None = None
        if spec.stream:
            self.merger = StreamMerger(
                spec.trace, spec.client_id, spec.created, spec.chat, spec.choices
            )
        # Both legs leave now: decode must hold the request to reserve its slot early.
        self.prefill = spec.open_leg(spec.prefill, spec.prefill_content)
        self.decode = spec.open_leg(spec.decode, spec.raw)
        self.legs = (self.prefill, self.decode)
        self.first: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        """Stream: the client's first events (bytes). Not streamed: prefill's answer (dict)."""
        self._gate: asyncio.Future[None] | None = None
        self.decode.dispatched.add_done_callback(self._open_gate)
        self.prefill_reader = asyncio.ensure_future(self._read_prefill())

    @property
    def produced(self) -> bool:
        """Prefill produced its token, so its server holds a KV entry until decode pulls it."""
        return self.first.done() and not self.first.cancelled() and not self.first.exception()

    @property
    def clean(self) -> bool:
        return self.decode.progress is Progress.FINISHED and self.decode.error is None

    # -- the answer ------------------------------------------------------------------------------
    async def start(self) -> None:
        """Prefill's first token, or the first error of either leg: a decode leg that fails
        before prefill's token makes waiting for prefill pointless.

        The wait is on a gate only this task awaits, opened in the same step that settles
        `first` (not by a callback one loop pass later: under load a pass is tens of
        milliseconds of other streams' events, and they add up in the TTFT).
        """
        decode = self.decode.dispatched
        while True:
            if decode.done():
                await self.decode.response()  # raises decode's error, if that is what happened
            if self.first.done():
                self.first.result()
                return
            self._gate = asyncio.get_running_loop().create_future()
            await self._gate

    def _open_gate(self, _: object = None) -> None:
        gate = self._gate
        if gate is not None and not gate.done():
            gate.set_result(None)

    async def events(self) -> AsyncIterator[bytes]:
        merger = self.merger
        assert merger is not None
        # The first token goes out as soon as prefill has it, whatever decode is doing.
        yield self.first.result()
        while (batch := await self.decode.next_events()) is not None:
            if len(batch) == 1:  # one event per read is the common case
                if events := merger.decode(batch[0]):
                    yield events
            elif events := b"".join([merger.decode(data) for data in batch]):
                yield events

    async def answer(self) -> dict[str, Any]:
        spec, trace = self.spec, self.spec.trace
        prefill_answer: dict[str, Any] = self.first.result()
        trace.prefill_done = time.perf_counter()
        try:
            async with asyncio.timeout(spec.decode_timeout):
                body = await self.decode.json(spec.max_response_bytes)
        except TimeoutError:
            raise UpstreamError.make(
                "decode", 504, "timeout",
                f"decode server did not answer within {spec.decode_timeout:g}s",
                self.decode.backend.url,
            ) from None  # fmt: skip
        body["id"] = spec.client_id
        body["created"] = spec.created
        usage = body.get("usage") or prefill_answer.get("usage") or {}
        if isinstance(usage, dict):
            if isinstance(usage.get("prompt_tokens"), int):
                trace.prompt_tokens = usage["prompt_tokens"]
            if isinstance(usage.get("completion_tokens"), int):
                trace.completion_tokens = usage["completion_tokens"]
        return body

    async def _read_prefill(self) -> None:
        spec = self.spec
        backend = self.prefill.backend
        try:
            async with asyncio.timeout(spec.prefill_timeout):
                self.first.set_result(await self._first_token())
            backend.timeouts_in_a_row = 0
        except TimeoutError:
            backend.timeouts_in_a_row += 1
            what = f"did not produce the first token within {spec.prefill_timeout:g}s"
            self.first.set_exception(
                UpstreamError.make("prefill", 504, "timeout", f"prefill server {what}", backend.url)
            )
            return
        except UpstreamError as exc:
            self.first.set_exception(exc)
            return
        finally:
            self._open_gate()
        if self.merger is not None:  # the rest: prefill's usage chunk (the prompt size), [DONE]
            try:
                while (batch := await self.prefill.next_events()) is not None:
                    for data in batch:
                        self.merger.prefill(data)
            except UpstreamError as exc:
                log.info("prefill stream ended badly after its token: %s", exc.detail or exc)

    async def _first_token(self) -> Any:
        merger = self.merger
        if merger is None:
            return await self.prefill.json(self.spec.max_response_bytes)
        events: list[bytes] = []
        while not merger.has_first_tokens:
            batch = await self.prefill.next_events()
            if batch is None:
                raise UpstreamError.make(
                    "prefill", 502, "stream_cut", "prefill server ended its stream without a token"
                )
            events.extend(merger.prefill(data) for data in batch)
        return b"".join(events)

    # -- the end ---------------------------------------------------------------------------------
    def detach(self, scratch: RequestTrace) -> None:
        if self.merger is not None:
            self.merger.trace = scratch

    async def tail(self, timeout: float) -> None:
        if self.merger is not None and self.spec.trace.prompt_tokens is None:
            await asyncio.wait((self.prefill_reader,), timeout=timeout)

    async def finish(self) -> None:
        try:
            await asyncio.wait((self.prefill_reader,))
        finally:
            await super().finish()

    async def settle(self, settler: Settler) -> None:
        try:
            await self._settle(settler)
        finally:
            if not self.prefill_reader.done():
                self.prefill_reader.cancel()
            await super().finish()

    async def _settle(self, settler: Settler) -> None:
        await asyncio.wait((self.prefill_reader,))  # rule 1: prefill runs to its end
        decode = self.decode
        if decode.dispatched.done():
            with contextlib.suppress(UpstreamError):
                await decode.response()  # a refusal or rejection shows now
        if decode.progress >= Progress.EMITTED:
            return  # past `transferring`: closing it aborts it
        produced = self.produced
        failed = decode.error
        if failed is None or not (failed.never_arrived or failed.rejected):
            # Rule 2: decode may be waiting for KV (accepted, or broken before emitting).
            with settler.orphan():
                produced = produced or await settler.rescue(
                    self.prefill, self.spec.stream, self._first_failure()
                )
                if failed is None:
                    try:
                        await self._until_emitted()
                        return
                    except UpstreamError as exc:
                        failed = exc
                elif not self.produced:
                    return  # its KV is on the way; nothing more can be known of it
        # Rule 3: decode ended before emitting. A KV entry made for it is stranded when decode
        # never took the request, or a stream stayed silent for its whole timeout (a decode
        # that pulls emits at once: a silent one was queued): abort it and pull the entry. A
        # connection that broke tells nothing (decode may have pulled and emitted the bytes
        # that were lost), nor does a silent non-streamed decode (it may be running a long
        # answer): a release then would wait in `transferring` for good, so leave it.
        assert failed is not None
        if not produced:
            return
        silent = failed.error_type == "timeout" and self.spec.stream
        if failed.never_arrived or failed.rejected or silent:
            await decode.aclose()
            await settler.release(release_content(self.prefill), decode, self.prefill.backend)
        else:
            log.warning(
                "decode %s broke before it emitted (%s): its KV entry may stay pinned",
                decode.headers.get("X-Request-Id"), failed.error_type,
            )  # fmt: skip

    async def _until_emitted(self) -> None:
        """A streamed decode's first event, or a non-streamed decode's headers (vLLM sends them
        with the whole answer): either way the request has left `transferring`."""
        if self.spec.stream:
            await self.decode.next_events()
        else:
            await self.decode.response()

    def _first_failure(self) -> str:
        first = self.first
        error = first.exception() if first.done() and not first.cancelled() else None
        return error.error_type if isinstance(error, UpstreamError) else "cancelled"


def release_content(prefill: Leg) -> bytes:
    """Prefill's own request (one token), not streamed: it pairs with the entry and frees it."""
    body = orjson.loads(prefill.content)
    body["stream"] = False
    body.pop("stream_options", None)
    return orjson.dumps(body)
