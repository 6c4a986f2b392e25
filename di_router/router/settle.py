"""Finishing, in the background, the legs of a request that did not end cleanly.

On Neuron's servers (vLLM 0.7.2 fork, NeuronConnector) two things cannot be undone by closing a
connection:
- a decode request waiting for its KV sits in the scheduler's `transferring` queue, which abort
  never scans, and its KV lookup retries forever: only a prefill with the same engine id
  finishing moves it on (then it runs to `max_tokens`, or until an abort finds it running);
- a finished prefill keeps its KV, and its slot, until a decode pulls it.

So every pair is settled by the same rules, however its request ended:
1. Prefill is never cancelled before its first token: its reader runs to the end (bounded by
   the prefill timeout).
2. A decode that may be waiting for KV (sent, not refused, not yet emitted) needs prefill's
   entry: if prefill failed, the same prefill request is sent again to the same server
   ("rescue", with backoff, bounded). Then decode is read until it emits (it is past
   `transferring`, so closing it aborts it) or ends.
3. A decode that never took the request (refused, or rejected it), or that ended before it
   emitted, will not pull prefill's entry: if prefill produced one, the router pulls it itself
   with a one-token decode request under the same `X-Request-Id` ("release").
Everything is bounded by the settle timeout; what is given up is counted and logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING

import orjson

from di_router.router.metrics import RouterMetrics
from di_router.router.upstream import Leg, Progress, UpstreamError

if TYPE_CHECKING:
    from di_router.router.lifecycle import Pair

log = logging.getLogger("di_router.settle")

RESCUE_BACKOFF_S = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0)
"""Waits between tries; the last repeats until the settle timeout."""


class Settler:
    def __init__(self, metrics: RouterMetrics, timeout: float) -> None:
        self._metrics = metrics
        self._timeout = timeout
        self._tasks: set[asyncio.Task[None]] = set()
        self.orphaned = 0
        """Decode requests held open because they may be waiting for KV that may not come."""

    def take(self, pair: Pair, clean: bool) -> None:
        """Own the pair from now on; a clean end only needs prefill's tail read and both
        connections returned."""
        task = asyncio.ensure_future(self._finish(pair) if clean else self._settle(pair))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def wait(self, timeout: float) -> None:
        """Shutdown: give running settlements some time, then stop them."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _finish(self, pair: Pair) -> None:
        try:
            await asyncio.wait((pair.prefill_reader,))
        finally:
            await pair.close()

    async def _settle(self, pair: Pair) -> None:
        try:
            async with asyncio.timeout(self._timeout):
                await self._settle_pair(pair)
        except TimeoutError:
            log.warning(
                "gave up settling request %s after %gs",
                pair.decode.headers.get("X-Request-Id"),
                self._timeout,
            )
        finally:
            if not pair.prefill_reader.done():
                pair.prefill_reader.cancel()
            await pair.close()

    async def _settle_pair(self, pair: Pair) -> None:
        await asyncio.wait((pair.prefill_reader,))  # rule 1: prefill runs to its end
        decode = pair.decode
        if decode.dispatched.done():
            with contextlib.suppress(UpstreamError):
                await decode.response()  # a refusal or rejection shows now
        if decode.progress >= Progress.EMITTED:
            return  # past `transferring`: closing it aborts it
        produced = pair.produced
        failed = decode.error
        if failed is None or not (failed.never_arrived or failed.rejected):
            # Rule 2: decode may be waiting for KV (accepted, or broken before emitting).
            self._metrics.orphaned_decodes.inc()
            self.orphaned += 1
            try:
                produced = produced or await self._rescue(pair)
                if failed is None:
                    try:
                        await _until_emitted(decode, pair.stream)
                        return
                    except UpstreamError as exc:
                        failed = exc
                elif not pair.produced:
                    return  # its KV is on the way; nothing more can be known of it
            finally:
                self._metrics.orphaned_decodes.dec()
                self.orphaned -= 1
        # Rule 3: decode ended before emitting. A KV entry made for it is stranded (a decode
        # that waited this long was queued, not pulling): abort it and pull the entry.
        if produced:
            await decode.aclose()
            await self._release(pair)

    async def _rescue(self, pair: Pair) -> bool:
        """Send prefill's request again to the same server until it produces the KV entry the
        waiting decode needs. A 4xx is final (the request itself is refused); anything else
        (refused connection, 5xx, a server restarting) is tried again until the settle
        timeout, which bounds the whole settlement."""
        first = pair.first.exception() if pair.first.done() and not pair.first.cancelled() else None
        reason = first.error_type if isinstance(first, UpstreamError) else "cancelled"
        rescues = self._metrics.prefill_rescues
        rescues.labels("attempted", reason).inc()
        await pair.prefill.aclose()  # a prefill that timed out must not produce a second entry
        tries = 0
        while True:
            leg = pair.prefill.resend(self._timeout)
            try:
                await _run_to_end(leg, pair.stream)
            except UpstreamError as exc:
                if exc.rejected and 400 <= exc.status < 500:
                    rescues.labels("given_up", exc.error_type).inc()
                    log.warning("prefill rescue refused (%s): decode slot stays held", exc.message)
                    return False
                await asyncio.sleep(RESCUE_BACKOFF_S[min(tries, len(RESCUE_BACKOFF_S) - 1)])
                tries += 1
                continue
            except asyncio.CancelledError:
                rescues.labels("given_up", "timeout").inc()
                raise
            finally:
                await leg.aclose()
            rescues.labels("succeeded", reason).inc()
            return True

    async def _release(self, pair: Pair) -> None:
        """Rule 3: pull the stranded KV entry with a one-token decode request."""
        content = _release_content(pair.prefill.content)
        outcome = "failed"
        for delay in RESCUE_BACKOFF_S[:4]:
            puller = Leg(
                pair.decode.backend, pair.decode.path, content, pair.decode.headers,
                pair.decode.read_timeout, 1 << 20,
            )  # fmt: skip
            try:
                await puller.json(1 << 20)
                outcome = "released"
                break
            except UpstreamError as exc:
                if exc.rejected:
                    log.warning("could not release a KV entry: %s", exc.message)
                    break
                await asyncio.sleep(delay)
            finally:
                await puller.aclose()
        self._metrics.kv_releases.labels(outcome).inc()
        if outcome == "failed":
            pair.prefill.backend.stranded += 1


async def _until_emitted(decode: Leg, stream: bool) -> None:
    """A streamed decode's first event, or a non-streamed decode's headers (vLLM sends them
    with the whole answer): either way the request has left `transferring`."""
    if stream:
        await decode.next_events()
    else:
        await decode.response()


async def _run_to_end(leg: Leg, stream: bool) -> None:
    if stream:
        while await leg.next_events() is not None:
            pass
    else:
        await leg.json(1 << 24)


def _release_content(prefill_content: bytes) -> bytes:
    """Prefill's own request (one token), not streamed: it pairs with the entry and frees it."""
    body = orjson.loads(prefill_content)
    body["stream"] = False
    body.pop("stream_options", None)
    return orjson.dumps(body)
