"""Releasing a KV entry that prefill pinned for a decode server that then refused the request.

Neuron's V0 connector keeps a finished prefill's KV cache, and its batch slot, until a decode
server pulls it, and has no API to drop it. When decode rejects a request (say, a context limit
that only decode enforces) after prefill has produced the first token, nobody would ever pull
that entry: the slot leaks. So the router pulls it itself: a one-token request with the same
`X-Request-Id` to the same decode server pairs with the entry and frees it. The client has its
answer already; this runs in the background, bounded by the router's timeouts.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

from di_router.router.exchange import close_prefill_reader
from di_router.router.metrics import RouterMetrics
from di_router.router.upstream import Leg, UpstreamError

log = logging.getLogger("di_router.kv_release")


async def release_pinned_kv(
    prefill: Leg,
    step: asyncio.Task[Any] | None,
    stream: AsyncIterator[list[bytes]] | None,
    decode: Leg,
    content: bytes,
    prefill_timeout: float,
    metrics: RouterMetrics,
) -> None:
    """Let prefill finish; if it produced its token, pull the entry with a one-token decode."""
    outcome = "not_needed"
    try:
        if step is not None:
            async with asyncio.timeout(prefill_timeout):
                await asyncio.wait((step,))
            produced = not step.cancelled() and step.exception() is None
        else:
            produced = False
        if produced:
            puller = Leg(decode.backend, decode.path, content, decode.headers, prefill_timeout)
            try:
                await puller.json()
                outcome = "released"
            except UpstreamError as exc:
                outcome = "failed"
                log.warning(
                    "could not release the KV entry of %s: %s",
                    decode.headers.get("X-Request-Id"),
                    exc.message,
                )
            finally:
                await puller.aclose()
    except TimeoutError:
        outcome = "failed"
    finally:
        await close_prefill_reader(step, stream)
        await prefill.aclose()
        metrics.kv_releases.labels(outcome).inc()
