"""A worker's presence in the registry: its key, kept alive under a lease while it runs."""

from __future__ import annotations

import asyncio
import logging

from di_router.discovery.backoff import Backoff
from di_router.discovery.etcd import EtcdClient, EtcdError
from di_router.discovery.layout import Worker, WorkerRole, worker_key

log = logging.getLogger("di_router.discovery")

DEFAULT_TTL_S = 60
KEEPALIVES_PER_TTL = 20
"""Neuron 2.26 workers: a 60 s lease refreshed every 3 s. A crashed worker leaves every router
within a TTL; a live one rides out etcd outages of many refresh intervals."""


class WorkerRegistration:
    """Keeps `/workers/<role>/<ip>/<port>` in etcd under a lease from `start` to `stop`.

    Registering never fails the worker: while etcd is unreachable it retries with backoff, and
    a lease etcd no longer knows (it expired while the worker was cut off, or etcd came back
    without its data) is replaced by a new lease and the key put again. `stop` revokes the lease,
    so the key goes at once instead of a TTL later. The caller owns `client`.
    """

    def __init__(
        self,
        client: EtcdClient,
        role: WorkerRole,
        worker: Worker,
        *,
        ttl_s: int = DEFAULT_TTL_S,
        value: str = "",
    ) -> None:
        if ttl_s < 1:
            raise ValueError(f"lease TTL must be at least 1 s, got {ttl_s}")
        self.key = worker_key(role, worker)
        self._client = client
        self._ttl_s = ttl_s
        self._value = value
        self._lease: int | None = None
        self._registered = False
        self._task: asyncio.Task[None] | None = None

    @property
    def registered(self) -> bool:
        """The key is in etcd under a live lease, as of etcd's last answer."""
        return self._registered

    def start(self) -> None:
        """Register in the background (call from the running event loop)."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"etcd registration {self.key}")

    async def stop(self) -> None:
        """Stop refreshing and revoke the lease (bounded by the client's timeout); if etcd cannot
        be reached the key stays until its TTL runs out."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait({self._task})
            self._task = None
        lease, self._lease, self._registered = self._lease, None, False
        if lease is None:
            return
        try:
            await self._client.revoke(lease)
            log.info("etcd: unregistered %s", self.key)
        except EtcdError as exc:
            log.warning(
                "etcd: could not revoke %s (it expires within %d s): %s", self.key, self._ttl_s, exc
            )

    async def _run(self) -> None:
        backoff = Backoff()
        interval = self._ttl_s / KEEPALIVES_PER_TTL
        failing = False
        while True:
            try:
                if self._lease is None:
                    interval = await self._register() / KEEPALIVES_PER_TTL
                elif await self._client.keepalive(self._lease) <= 0:
                    log.warning("etcd: the lease of %s is gone; registering again", self.key)
                    self._lease, self._registered = None, False
                    continue
            except EtcdError as exc:
                if not failing:
                    log.warning("etcd: cannot register or refresh %s, retrying: %s", self.key, exc)
                    failing = True
                # A lease we hold is kept: etcd keeps leases across its restarts, and the next
                # keepalive that gets through says whether it survived.
                await asyncio.sleep(interval if self._lease is not None else backoff.next())
                continue
            if failing:
                log.info("etcd: reachable again (%s)", self.key)
                failing = False
            backoff.reset()
            await asyncio.sleep(interval)

    async def _register(self) -> int:
        """Grant a lease and put the key under it; the granted TTL."""
        lease, ttl = await self._client.grant(self._ttl_s)
        self._lease = lease  # before the put: `stop` revokes it even if cancelled mid-put
        try:
            await self._client.put(self.key, self._value, lease)
        except EtcdError:
            self._lease = None  # expires by itself, with nothing attached
            raise
        self._registered = True
        log.info("etcd: registered %s (lease %x, TTL %d s)", self.key, lease, ttl)
        return ttl
