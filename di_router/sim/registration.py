"""A simulator whose KV transfer config names etcd registers in it, as Neuron 2.26 workers do.

The 2.26 tutorial starts each worker with `"etcd": "HOST:PORT"` in `--kv-transfer-config`; the
worker then keeps `/workers/<prefill|decode>/<ip>/<api port>` alive under a lease. Here the
key is put once the server has started (just before its listener binds) and the lease is revoked
when it shuts down.
"""

from __future__ import annotations

import json
import logging
import socket
from collections.abc import AsyncGenerator
from urllib.parse import urlsplit

from quart import Quart

from di_router.discovery import EtcdClient, Worker, WorkerRegistration, WorkerRole
from di_router.sim.engine import Role
from di_router.sim.settings import SimSettings

log = logging.getLogger("di_router.sim")

_WORKER_ROLES: dict[Role, WorkerRole] = {Role.PREFILL: "prefill", Role.DECODE: "decode"}
_ANY_ADDRESS = ("", "0.0.0.0", "::")


def install_registration(app: Quart, settings: SimSettings) -> None:
    """Register `app`'s server in etcd while it serves, if its KV config names etcd."""
    kv = settings.kv_config
    if kv is None or kv.etcd is None:
        return
    role = _WORKER_ROLES.get(settings.role)
    if role is None:
        log.warning(
            "etcd %s: kv_role %s is neither producer nor consumer; not registering",
            kv.etcd,
            kv.kv_role,
        )
        return
    client = EtcdClient(kv.etcd)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per keepalive (3 s)
    worker = Worker(advertised_ip(settings.host, client.url), settings.port)
    info = json.dumps({"model": settings.model_name, "kv_role": kv.kv_role})
    registration = WorkerRegistration(client, role, worker, value=info)

    # Quart starts while-serving hooks after every before-serving one (KV pairing) and ends them
    # before any after-serving one: the key goes before the engine stops.
    @app.while_serving
    async def _registered() -> AsyncGenerator[None, None]:
        registration.start()
        yield
        await registration.stop()
        await client.aclose()


def advertised_ip(host: str, etcd_url: str) -> str:
    """The address routers reach this server at: `--host` when it names one; when it listens on
    every interface, the local address of its route to etcd (read from a connected UDP socket,
    which sends no packet)."""
    if host not in _ANY_ADDRESS:
        return host
    parts = urlsplit(etcd_url)
    target = (parts.hostname or "", parts.port or 0)
    try:
        family = socket.getaddrinfo(*target, type=socket.SOCK_DGRAM)[0][0]
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect(target)
            return str(probe.getsockname()[0])
    except OSError as exc:
        name = socket.gethostname()
        log.warning("no route to etcd at %s (%s); registering as %s", etcd_url, exc, name)
        return name
