"""The Neuron vLLM fork's DI protocol (what `neuron-proxy-server` speaks, Neuron 2.24).

Both legs go out at once with one shared `X-Request-Id`, from which both servers derive the
engine request id that pairs their KV; prefill returns the first token, and decode repeats it
as its own first output before continuing (`relay.StreamMerger` merges the two).

On these servers a cut leg can hold a slot for good: a decode request waiting for its KV sits
in the scheduler's `transferring` queue, which abort never scans, and its KV lookup retries
without end; a finished prefill keeps its KV, and its slot, until a decode pulls it. So decode
is always read as a stream where its answer can be rebuilt exactly (`answer_from_stream.py`):
vLLM sends a stream's headers before it adds the request to its engine, and its first event
once the KV wait is over, so the router knows where decode is. An exchange that did not end
cleanly is settled by three rules:
1. Prefill is never cancelled before its first token: its reader is a task of its own that
   runs to the end (bounded by the prefill timeout), whoever ends the request.
2. A decode that may be waiting for KV (sent, not refused, not yet emitted) needs prefill's
   entry. A streamed prefill that missed its timeout past its headers is in its engine: it is
   read on until it produces (or decode pulls and emits), never aborted. A prefill that failed
   after it may have run (cut, malformed, silent) is aborted and decode given a grace to pull
   an entry made before. Only then, or at once if prefill never arrived or was refused, is the
   same prefill request sent again to the same server ("rescue"): a second request under an id
   whose entry is still unpulled ends a 2.24 producer's engine (see `_prefill_may_have_run`).
   Then decode is held until it emits (it is past `transferring`, so closing it aborts it),
   however long past its client's deadline: a silent decode past its headers may be queued
   for a slot (it will pull) or stalled past its pull (a release would wait for good).
3. A decode that never took the request (refused, rejected, or a stream still without headers
   at the decode timeout) will not pull prefill's entry: if prefill produced one, the router
   pulls it itself with a one-token decode request under the same id ("release").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import orjson

from di_router.router.answer_from_stream import (
    STREAMED_DECODE_OPTIONS,
    AnswerFromStream,
    streamable,
)
from di_router.router.exchange import Exchange, ExchangeSpec, first_token_body
from di_router.router.relay import StreamMerger
from di_router.router.request_view import RequestView, di_unsupported
from di_router.router.trace import RequestTrace
from di_router.router.upstream import Leg, Progress, UpstreamError

if TYPE_CHECKING:
    from di_router.router.settle import Settler

log = logging.getLogger("di_router.neuron")

PULL_GRACE_S = 2.0
"""How long a decode whose prefill lost its answer is given to emit before prefill is re-sent:
a decode pulls an entry that exists at once (its lookup retries without pause) and emits
within a step or two."""


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

    def streamed_decode_body(self, body: dict[str, Any], chat: bool) -> dict[str, Any] | None:
        """Decode is read as a stream whenever its answer can be rebuilt exactly: only a stream
        tells whether decode took the request (rule 3) and left its KV wait."""
        if not streamable(body, chat):
            return None
        return {**body, "stream": True, "stream_options": STREAMED_DECODE_OPTIONS}

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
        # Both legs leave now: decode must hold the request to reserve its slot early. Decode
        # may be kept past the client's deadline (rule 2): the exchange bounds the client's
        # wait for its first event itself.
        self.prefill = spec.open_leg(spec.prefill, spec.prefill_content)
        self.decode = spec.open_leg(spec.decode, spec.decode_content, held=True)
        self.legs = (self.prefill, self.decode)
        loop = asyncio.get_running_loop()
        self._decode_deadline = loop.time() + spec.decode_timeout
        self.first: asyncio.Future[Any] = loop.create_future()
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
        batch = await self._first_decode_events()
        while batch is not None:
            if len(batch) == 1:  # one event per read is the common case
                if events := merger.decode(batch[0]):
                    yield events
            elif events := b"".join([merger.decode(data) for data in batch]):
                yield events
            batch = await self.decode.next_events()

    async def _first_decode_events(self) -> list[bytes] | None:
        """Decode's first events within the decode timeout of the request; from then on its
        socket's silence is bounded by that timeout too (a decode that emitted is past
        `transferring`, so a cut aborts it)."""
        decode = self.decode
        try:
            async with asyncio.timeout_at(self._decode_deadline):
                batch = await decode.next_events()
        except TimeoutError:
            raise self._decode_timed_out("sent no token") from None
        decode.set_silence(self.spec.decode_timeout)
        return batch

    def _decode_timed_out(self, what: str) -> UpstreamError:
        timeout = self.spec.decode_timeout
        return UpstreamError.make(
            "decode", 504, "timeout", f"decode server {what} within {timeout:g}s",
            self.decode.backend.url,
        )  # fmt: skip

    async def answer(self) -> dict[str, Any]:
        spec, trace = self.spec, self.spec.trace
        prefill_answer: dict[str, Any] = self.first.result()
        trace.prefill_done = time.perf_counter()
        try:
            async with asyncio.timeout(spec.decode_timeout):
                if spec.decode_streamed:
                    body = await self._answer_from_stream(prefill_answer)
                else:
                    body = await self.decode.json(spec.max_response_bytes)
        except TimeoutError:
            raise self._decode_timed_out("did not answer") from None
        body["id"] = spec.client_id
        body["created"] = spec.created
        usage = body.get("usage") or prefill_answer.get("usage") or {}
        if isinstance(usage, dict):
            if isinstance(usage.get("prompt_tokens"), int):
                trace.prompt_tokens = usage["prompt_tokens"]
            if isinstance(usage.get("completion_tokens"), int):
                trace.completion_tokens = usage["completion_tokens"]
        return body

    async def _answer_from_stream(self, prefill_answer: dict[str, Any]) -> dict[str, Any]:
        spec = self.spec
        answer = AnswerFromStream(spec.chat)
        while (batch := await self.decode.next_events()) is not None:
            for data in batch:
                try:
                    answer.feed(data)
                except UpstreamError as exc:
                    if exc.error_type != "stream_error":
                        raise
                    # vLLM gives every error inside a stream code 400; the same failure of a
                    # whole answer is its server's (a 500): the client gets the 502 it would.
                    raise UpstreamError.make(
                        "decode", 502, "stream_error",
                        f"decode server failed mid-answer: {exc.message}",
                    ) from None  # fmt: skip
            if answer.size > spec.max_response_bytes:  # the answer's text, not its framing
                raise UpstreamError.make(
                    "decode", 502, "too_large",
                    f"decode server answer is larger than {spec.max_response_bytes} B",
                    self.decode.backend.url,
                )  # fmt: skip
        prompt = (prefill_answer.get("usage") or {}).get("prompt_tokens")
        return answer.body(spec.client_id, spec.created, prompt if isinstance(prompt, int) else 0)

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
        failed = await self._decode_admission()
        if decode.progress >= Progress.EMITTED:
            return  # past `transferring`: closing it aborts it
        produced = self.produced
        if failed is None or not (failed.never_arrived or failed.rejected):
            # Rule 2: decode may be waiting for KV (accepted, or broken before emitting).
            with settler.orphan():
                if not produced and self._prefill_in_engine():
                    # Only its client's wait timed out: the request is in prefill's engine
                    # (aborting it could race its entry). Let it finish instead, or its entry
                    # be pulled (a stalled answer may hide a made entry).
                    produced, emitted, failed = await self._prefill_or_pull(failed)
                    if emitted:
                        return
                if not produced and failed is None and self._prefill_may_have_run():
                    # Abort it first (what has not produced by now never will), then see
                    # whether decode pulls an entry it made before the abort.
                    await self.prefill.aclose()
                    try:
                        async with asyncio.timeout(PULL_GRACE_S):
                            await self._until_emitted()
                        return  # the entry existed: decode pulled it, no rescue
                    except TimeoutError:
                        pass
                    except UpstreamError as exc:
                        failed = exc
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
        # never took the request: pull the entry. A connection that broke tells nothing
        # (decode may have pulled and emitted the bytes that were lost): a release then would
        # wait in `transferring` for good, so leave it.
        assert failed is not None
        if not produced:
            return
        if failed.never_arrived or failed.rejected:
            await decode.aclose()
            await settler.release(release_content(self.prefill), decode, self.prefill.backend)
        else:
            log.warning(
                "decode %s broke before it emitted (%s): its KV entry may stay pinned",
                decode.headers.get("X-Request-Id"), failed.error_type,
            )  # fmt: skip

    async def _decode_admission(self) -> UpstreamError | None:
        """Decode's failure to take the request, if it failed. vLLM sends a stream's headers
        before it adds the request to its engine, so a streamed decode without them at its
        deadline never reached the engine (it is closed: it never will) and counts as never
        arrived. A non-streamed decode sends its headers with the whole answer: nothing is
        known of it before."""
        decode = self.decode
        try:
            if self.spec.decode_streamed and decode.progress is Progress.SENT:
                try:
                    async with asyncio.timeout_at(self._decode_deadline):
                        await decode.response()
                except TimeoutError:
                    await decode.aclose()
                    return UpstreamError.make(
                        "decode", 504, "not_admitted", "decode server sent no headers"
                    )
            elif decode.dispatched.done():
                await decode.response()  # a refusal or rejection shows now
        except UpstreamError as exc:
            return exc
        return decode.error

    async def _until_emitted(self) -> None:
        """A streamed decode's first event, or a non-streamed decode's headers (vLLM sends them
        with the whole answer): either way the request has left `transferring`."""
        if self.spec.decode_streamed:
            await self.decode.next_events()
        else:
            await self.decode.response()

    def _prefill_in_engine(self) -> bool:
        """The late prefill is in its engine for sure: a streamed vLLM answer sends its headers
        before the request is added to the engine, so a stream past its headers is queued or
        running there. Before them (or not streamed) it may be in the HTTP layer only, where
        an abort and a re-send are safe and a wait could last for good."""
        prefill = self.prefill
        return self.spec.stream and prefill.error is None and prefill.progress is Progress.ACCEPTED

    async def _prefill_or_pull(
        self, failed: UpstreamError | None
    ) -> tuple[bool, bool, UpstreamError | None]:
        """(produced, emitted, decode's failure): the late prefill read on until it produces
        or ends, while a decode that may still pull is read until it emits."""
        finishes = asyncio.ensure_future(self._prefill_finishes())
        pulls = asyncio.ensure_future(self._until_emitted()) if failed is None else None
        try:
            waiting = {finishes} if pulls is None else {finishes, pulls}
            done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            if pulls in done:
                assert pulls is not None
                if pulls.exception() is None:
                    return True, True, None
                error = pulls.exception()
                failed = error if isinstance(error, UpstreamError) else failed
            return await finishes, False, failed
        finally:
            for task in (finishes, pulls):
                if task is not None and not task.done():
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError, UpstreamError):
                        await task

    async def _prefill_finishes(self) -> bool:
        """The streamed prefill leg read on past the prefill timeout (bounded by the settler):
        True once its engine produced (any event: vLLM sends none before the first token)."""
        try:
            return await self.prefill.next_events() is not None
        except UpstreamError:
            return False

    def _prefill_may_have_run(self) -> bool:
        """Prefill reached its engine and only its answer was lost (cut, malformed, silent):
        its KV entry may exist. A rescue then would put a second request under the same id
        beside the first in the producer's `transferring` queue; on the 2.24 fork both check
        one `lookup_dict` entry, the first to see it pulled deletes it and the second's lookup
        raises (`free_transferred_seq_groups`), which ends the engine's loop."""
        error = self._first_error()
        return error is None or not (error.never_arrived or error.rejected)

    def _first_failure(self) -> str:
        error = self._first_error()
        return error.error_type if error is not None else "cancelled"

    def _first_error(self) -> UpstreamError | None:
        first = self.first
        error = first.exception() if first.done() and not first.cancelled() else None
        return error if isinstance(error, UpstreamError) else None


def release_content(prefill: Leg) -> bytes:
    """Prefill's own request (one token), not streamed: it pairs with the entry and frees it."""
    body = orjson.loads(prefill.content)
    body["stream"] = False
    body.pop("stream_options", None)
    return orjson.dumps(body)
