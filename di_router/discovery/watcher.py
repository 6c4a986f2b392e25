"""The live set of workers in the registry, for a router's backend pools."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping

from di_router.discovery.backoff import Backoff
from di_router.discovery.etcd import EtcdClient, EtcdError
from di_router.discovery.layout import ROLES, WORKERS_PREFIX, Worker, WorkerRole, parse_worker_key

log = logging.getLogger("di_router.discovery")

WorkerSets = Mapping[WorkerRole, frozenset[Worker]]
"""Every role, each with the workers registered in it (possibly none)."""


class WorkerWatcher:
    """Follows `/workers/` in etcd: a range, then a watch from the revision after it.

    Each (re)connection starts with a fresh range, so changes made while it was disconnected are
    picked up and the watch never asks for old revisions (etcd may have compacted them). While etcd
    is unreachable the last known sets stay, so a router keeps serving the workers it knew, and it
    reconnects with capped backoff. It runs as one task on the caller's event loop: no threads,
    no polling (besides an idle re-sync every `idle_timeout_s`, which bounds how long a silently
    dead connection goes unnoticed). `on_change` gets the new sets whenever they change; it runs
    on the event loop and must not block. The caller owns `client`.
    """

    def __init__(
        self,
        client: EtcdClient,
        on_change: Callable[[WorkerSets], None] | None = None,
        *,
        idle_timeout_s: float = 30.0,
        max_backoff_s: float = 5.0,
    ) -> None:
        self._client = client
        self._on_change = on_change
        self._idle_timeout_s = idle_timeout_s
        self._backoff = Backoff(max_s=max_backoff_s)
        self._keys: dict[str, tuple[WorkerRole, Worker]] = {}
        self._workers: WorkerSets = {role: frozenset() for role in ROLES}
        self._synced = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def workers(self) -> WorkerSets:
        """The current sets: etcd's as of the last sync, or the last known while disconnected."""
        return self._workers

    @property
    def synced(self) -> bool:
        """The sets follow etcd now (False before the first range and while disconnected)."""
        return self._synced.is_set()

    def start(self) -> None:
        """Start following (call from the running event loop)."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="etcd worker watch")

    async def wait_synced(self, timeout_s: float) -> bool:
        """Wait until the sets follow etcd; False if they still do not after `timeout_s`."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._synced.wait(), timeout_s)
        return self.synced

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait({self._task})
            self._task = None
        self._synced.clear()

    async def _run(self) -> None:
        while True:
            try:
                await self._sync_and_watch()
                continue  # idle: re-sync at once
            except EtcdError as exc:
                if self._synced.is_set():
                    counts = ", ".join(f"{len(w)} {role}" for role, w in self._workers.items())
                    log.warning("etcd: lost the registry (%s); keeping %s workers", exc, counts)
                self._synced.clear()
            await asyncio.sleep(self._backoff.next())

    async def _sync_and_watch(self) -> None:
        revision, kvs = await self._client.range_prefix(WORKERS_PREFIX)
        self._keys = {key: parsed for key in kvs if (parsed := parse_worker_key(key)) is not None}
        self._publish()
        if not self._synced.is_set():
            log.info("etcd: following the registry at %s", self._client.url)
            self._synced.set()
        self._backoff.reset()
        watch = self._client.watch_prefix(WORKERS_PREFIX, revision + 1, self._idle_timeout_s)
        async with contextlib.aclosing(watch) as batches:
            async for batch in batches:
                for event in batch:
                    if event.deleted:
                        self._keys.pop(event.key, None)
                    elif (parsed := parse_worker_key(event.key)) is not None:
                        self._keys[event.key] = parsed
                self._publish()

    def _publish(self) -> None:
        workers = {
            role: frozenset(w for r, w in self._keys.values() if r == role) for role in ROLES
        }
        if workers == self._workers:
            return
        for role in ROLES:
            for worker in workers[role] - self._workers[role]:
                log.info("etcd: %s worker %s:%d registered", role, worker.ip, worker.port)
            for worker in self._workers[role] - workers[role]:
                log.info("etcd: %s worker %s:%d left", role, worker.ip, worker.port)
        self._workers = workers
        if self._on_change is not None:
            try:
                self._on_change(workers)
            except Exception:
                log.exception("etcd: the worker-change callback failed")
