"""Backends that come and go: the pools follow etcd's worker registry (Neuron 2.26 layout).

Workers keep `/workers/<prefill|decode>/<ip>/<port>` alive under a lease; the watcher (see
`di_router.discovery`) reports every change and keeps the last known sets while etcd is
unreachable, so traffic goes on. A new worker is checked at once (its key can appear a moment
before its port accepts); a worker that left takes no new request, and its connections close
once the requests already on it are done.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from di_router.discovery import EtcdClient, Worker, WorkerSets, WorkerWatcher
from di_router.router.backends import Backend, BackendPool, make_backend
from di_router.router.config import RouterConfig
from di_router.router.health import HealthMonitor

log = logging.getLogger("di_router.registry")

_DRAIN_POLL_S = 0.5


def worker_url(worker: Worker, scheme: str = "http") -> str:
    host = f"[{worker.ip}]" if ":" in worker.ip else worker.ip
    return f"{scheme}://{host}:{worker.port}"


class Registry:
    def __init__(
        self,
        endpoint: str,
        pools: dict[str, BackendPool],
        config: RouterConfig,
        health: HealthMonitor,
    ) -> None:
        self._client = EtcdClient(endpoint)
        self._pools = pools
        self._config = config
        self._health = health
        self._watcher = WorkerWatcher(self._client, self._changed)
        self._retiring: set[asyncio.Task[None]] = set()

    async def start(self, sync_timeout_s: float = 5.0) -> None:
        self._watcher.start()
        if not await self._watcher.wait_synced(sync_timeout_s):
            log.warning("etcd at %s did not answer yet; serving from what it reports later",
                        self._client.url)  # fmt: skip

    async def stop(self) -> None:
        await self._watcher.stop()
        for task in self._retiring:
            task.cancel()
        await asyncio.gather(*self._retiring, return_exceptions=True)
        await self._client.aclose()

    def _changed(self, sets: WorkerSets) -> None:
        for role, pool in self._pools.items():
            wanted = {worker_url(w) for w in sets[role]}  # type: ignore[index]
            present = {b.url: b for b in pool.backends}
            for url in sorted(wanted - present.keys()):
                backend = make_backend(role, url, self._config)
                pool.backends.append(backend)
                log.info("%s server %s registered", role, url)
                self._health.check_soon(backend)
            for url in sorted(present.keys() - wanted):
                backend = present[url]
                pool.backends.remove(backend)
                self._health.forget(backend)
                log.info("%s server %s left the registry", role, url)
                task = asyncio.ensure_future(self._retire(backend))
                self._retiring.add(task)
                task.add_done_callback(self._retiring.discard)

    async def _retire(self, backend: Backend) -> None:
        """Close a departed backend's pools once nothing runs on it any more."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._config.settle_timeout_s):
                while backend.outstanding:
                    await asyncio.sleep(_DRAIN_POLL_S)
        await backend.aclose()
