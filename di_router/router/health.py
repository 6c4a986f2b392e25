"""Background health polling: readiness and `di_router_backend_up`, never on the request path.

Checks go through each backend's own probe pool, so they never queue behind traffic: a busy
backend is not a dead one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import httpx

from di_router.router.backends import Backend, BackendPool
from di_router.router.metrics import RouterMetrics

log = logging.getLogger("di_router.health")


class HealthMonitor:
    def __init__(
        self,
        pools: list[BackendPool],
        metrics: RouterMetrics,
        interval: float,
        authorization: str | None = None,
    ) -> None:
        self._pools = pools
        self._metrics = metrics
        self._interval = interval
        self._task: asyncio.Task[None] | None = None
        self._soon: set[asyncio.Task[None]] = set()
        # The model list is under /v1, which vLLM protects with its API key (if it has one).
        self._auth_headers = {"Authorization": authorization} if authorization else {}

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="di-router-health")

    def check_soon(self, backend: Backend) -> None:
        """A backend just discovered: check it now rather than at the next poll."""
        task = asyncio.ensure_future(self._check(backend))
        self._soon.add(task)
        task.add_done_callback(self._soon.discard)

    def forget(self, backend: Backend) -> None:
        """A backend that left: its series goes too (labels stay bounded)."""
        for gauge in (self._metrics.backend_up, self._metrics.backend_outstanding):
            with contextlib.suppress(KeyError):
                gauge.remove(backend.role, backend.url)

    async def stop(self) -> None:
        for task in self._soon:
            task.cancel()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def poll_once(self) -> None:
        backends = [b for pool in self._pools for b in pool.backends]
        await asyncio.gather(*(self._check(b) for b in backends))

    async def _run(self) -> None:
        while True:
            await self.poll_once()
            await asyncio.sleep(self._interval)

    async def _check(self, backend: Backend) -> None:
        try:
            response = await backend.probe.get("/health")
            healthy = response.status_code == 200
            if healthy and backend.role == "decode" and not backend.model_names:
                models = await backend.probe.get("/v1/models", headers=self._auth_headers)
                if models.status_code == 200:
                    backend.model_names = tuple(m["id"] for m in models.json().get("data", []))
        except (httpx.HTTPError, ValueError, KeyError, TypeError):
            healthy = False
        if healthy and not backend.healthy:
            backend.stranded = 0  # a server that was down restarted: it holds nothing now
        if healthy != backend.healthy:
            log.log(
                logging.INFO if healthy else logging.WARNING,
                "%s server %s is %s",
                backend.role,
                backend.url,
                "up" if healthy else "DOWN",
            )
        backend.healthy = healthy
        self._metrics.backend_up.labels(backend.role, backend.url).set(1 if healthy else 0)
        self._metrics.backend_outstanding.labels(backend.role, backend.url).set(backend.outstanding)

    def readiness(self) -> tuple[bool, dict[str, dict[str, str]]]:
        """Each backend "up", "down" (its /health fails) or "stuck": a prefill server that
        answers /health but whose slots are held by KV entries nobody will pull (releases
        failed, and its last requests timed out before their first token)."""
        report = {pool.role: {b.url: b.state for b in pool.backends} for pool in self._pools}
        ready = all(any(b.state == "up" for b in pool.backends) for pool in self._pools)
        return ready, report
