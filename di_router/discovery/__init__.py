"""Worker discovery through etcd, in Neuron 2.26's registry layout.

Workers keep `/workers/<prefill|decode>/<ip>/<api port>` alive under a lease
(`WorkerRegistration`); routers follow that prefix (`WorkerWatcher`). Both speak to etcd through
`EtcdClient`, a small asyncio client for etcd's JSON gateway.
"""

from di_router.discovery.etcd import EtcdClient, EtcdError, WatchEvent
from di_router.discovery.layout import (
    ROLES,
    WORKERS_PREFIX,
    Worker,
    WorkerRole,
    endpoint_url,
    parse_worker_key,
    worker_key,
)
from di_router.discovery.registration import DEFAULT_TTL_S, WorkerRegistration
from di_router.discovery.watcher import WorkerSets, WorkerWatcher

__all__ = [
    "DEFAULT_TTL_S",
    "ROLES",
    "WORKERS_PREFIX",
    "EtcdClient",
    "EtcdError",
    "WatchEvent",
    "Worker",
    "WorkerRegistration",
    "WorkerRole",
    "WorkerSets",
    "WorkerWatcher",
    "endpoint_url",
    "parse_worker_key",
    "worker_key",
]
