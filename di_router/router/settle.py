"""The settler: owner of every exchange whose request has ended, until its servers hold nothing.

A request's answer is done when its client has it (or has gone); its legs may still need work
for the servers to get their slots back (on Neuron a cut leg can hold one for good: see
`neuron.py`). The settler runs that work in the background, bounded by the settle timeout, and
offers the two remedies protocols use, with their metrics: re-sending a failed prefill
("rescue") and pulling a stranded KV entry ("release").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator

from di_router.router.backends import Backend
from di_router.router.exchange import Exchange
from di_router.router.metrics import RouterMetrics
from di_router.router.upstream import Leg, UpstreamError
from di_router.router.waiting import until_done

log = logging.getLogger("di_router.settle")

RESCUE_BACKOFF_S = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0)
"""Waits between tries; the last repeats until the settle timeout."""
_RELEASE_TRIES = 4
_RELEASE_BYTES = 1 << 20
_RESCUE_BYTES = 16 << 20
"""A re-sent prefill's non-streamed answer is read (and dropped) up to this size."""


class Settler:
    def __init__(self, metrics: RouterMetrics, timeout: float) -> None:
        self._metrics = metrics
        self._timeout = timeout
        self._tasks: set[asyncio.Task[None]] = set()
        self.orphaned = 0
        """Decode requests held open because they may be waiting for KV that may not come."""

    def take(self, exchange: Exchange, clean: bool) -> None:
        """Own the exchange from now on."""
        task = asyncio.ensure_future(self._end(exchange, clean))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @property
    def running(self) -> int:
        return len(self._tasks)

    async def wait(self, timeout: float, unless: asyncio.Event) -> None:
        """Shutdown: give running settlements some time (none once `unless` is set), then
        stop them."""
        await until_done(set(self._tasks), timeout, unless)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _end(self, exchange: Exchange, clean: bool) -> None:
        if clean:
            await exchange.finish()
            return
        try:
            async with asyncio.timeout(self._timeout):
                await exchange.settle(self)
        except TimeoutError:
            log.warning("gave up settling a request after %gs", self._timeout)

    @contextlib.contextmanager
    def orphan(self) -> Iterator[None]:
        """Count a decode that may be waiting for KV that may not come, while it is held."""
        self._metrics.orphaned_decodes.inc()
        self.orphaned += 1
        try:
            yield
        finally:
            self._metrics.orphaned_decodes.dec()
            self.orphaned -= 1

    async def rescue(self, prefill: Leg, stream: bool, reason: str) -> bool:
        """Send prefill's request again to the same server until it produces the KV entry a
        waiting decode needs. A 4xx is final (the request itself is refused); anything else
        (refused connection, 5xx, a server restarting) is tried again until the settle
        timeout, which bounds the whole settlement."""
        rescues = self._metrics.prefill_rescues
        rescues.labels("attempted", reason).inc()
        await prefill.aclose()  # a late prefill must not make its entry beside the re-sent one
        tries = 0
        while True:
            leg = prefill.resend(self._timeout)
            try:
                await _run_to_end(leg, stream)
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

    async def release(self, content: bytes, decode: Leg, holder: Backend) -> None:
        """Pull a stranded KV entry (on `holder`) with `content` (one token) sent to `decode`'s
        server under the same request id."""
        outcome = "failed"
        for delay in RESCUE_BACKOFF_S[:_RELEASE_TRIES]:
            puller = Leg(
                decode.backend, decode.path, content, decode.headers, decode.read_timeout,
                _RELEASE_BYTES,
            )  # fmt: skip
            try:
                await puller.json(_RELEASE_BYTES)
                outcome = "released"
                break
            except UpstreamError as exc:
                if not exc.never_arrived:  # a pull that reached decode may wait there: no second
                    log.warning("could not release a KV entry: %s", exc.message)
                    break
                await asyncio.sleep(delay)
            finally:
                await puller.aclose()
        self._metrics.kv_releases.labels(outcome).inc()
        if outcome == "failed":  # an entry nobody will pull: readiness counts it
            holder.stranded += 1


async def _run_to_end(leg: Leg, stream: bool) -> None:
    if stream:
        while await leg.next_events() is not None:
            pass
    else:
        await leg.json(_RESCUE_BYTES)
