"""Backend pools: "the prefill server" and "the decode server" are picks from these."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import httpx

from di_router.router.config import RouterConfig
from di_router.router.transport import AiohttpTransport

_HEALTH_CONNECTIONS = 2
_STUCK_AFTER_TIMEOUTS = 2


@dataclass(eq=False)
class Backend:
    role: str
    url: str
    transport: httpx.AsyncBaseTransport
    """Traffic only, used directly (no client layer on the hot path); its pool fits the load."""
    probe: httpx.AsyncClient
    """Health checks and model lists, on a pool of their own: a busy backend is not a dead one."""
    connect_timeout: float = 5.0
    healthy: bool = False
    stranded: int = 0
    """KV entries on this (prefill) server that nobody will pull: failed releases."""
    timeouts_in_a_row: int = 0
    """Prefill legs that timed out before their first token since the last that did not."""
    model_names: tuple[str, ...] = field(default_factory=tuple)
    _urls: dict[str, httpx.URL] = field(default_factory=dict, repr=False)

    @property
    def state(self) -> str:
        if not self.healthy:
            return "down"
        if self.stranded and self.timeouts_in_a_row >= _STUCK_AFTER_TIMEOUTS:
            return "stuck"
        return "up"

    def url_for(self, path: str) -> httpx.URL:
        url = self._urls.get(path)
        if url is None:
            url = self._urls[path] = httpx.URL(self.url + path)
        return url

    async def aclose(self) -> None:
        await self.transport.aclose()
        await self.probe.aclose()


class BackendPool:
    """Round-robin over the backends of one role that are up (all of them if none is)."""

    def __init__(self, role: str, backends: list[Backend]) -> None:
        self.role = role
        self.backends = backends
        self._counter = itertools.count()

    def pick(self) -> Backend:
        candidates = [b for b in self.backends if b.state == "up"] or self.backends
        return candidates[next(self._counter) % len(candidates)]

    async def aclose(self) -> None:
        for backend in self.backends:
            await backend.aclose()


def make_pool(role: str, urls: list[str], config: RouterConfig) -> BackendPool:
    keepalive = config.keepalive_expiry_s
    backends = [
        Backend(
            role,
            url.rstrip("/"),
            transport=AiohttpTransport(config.max_connections, keepalive, None),
            probe=httpx.AsyncClient(
                base_url=url,
                transport=AiohttpTransport(_HEALTH_CONNECTIONS, keepalive, None),
                timeout=config.health_timeout_s,
                trust_env=False,
            ),
            connect_timeout=config.connect_timeout_s,
        )
        for url in urls
    ]
    return BackendPool(role, backends)
