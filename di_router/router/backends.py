"""Backend pools: "the prefill server" and "the decode server" are picks from these."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import httpx

from di_router.router.config import RouterConfig


@dataclass(eq=False)
class Backend:
    role: str
    url: str
    client: httpx.AsyncClient
    healthy: bool = False
    model_names: tuple[str, ...] = field(default_factory=tuple)
    _urls: dict[str, httpx.URL] = field(default_factory=dict, repr=False)

    def url_for(self, path: str) -> httpx.URL:
        url = self._urls.get(path)
        if url is None:
            url = self._urls[path] = httpx.URL(self.url + path)
        return url


class BackendPool:
    """Round-robin over the healthy backends of one role (all of them if none is healthy)."""

    def __init__(self, role: str, backends: list[Backend]) -> None:
        self.role = role
        self.backends = backends
        self._counter = itertools.count()

    def pick(self) -> Backend:
        candidates = [b for b in self.backends if b.healthy] or self.backends
        return candidates[next(self._counter) % len(candidates)]

    @property
    def any_healthy(self) -> bool:
        return any(b.healthy for b in self.backends)

    async def aclose(self) -> None:
        for backend in self.backends:
            await backend.client.aclose()


def make_pool(role: str, urls: list[str], config: RouterConfig) -> BackendPool:
    """One long-lived pooled client per backend, with explicit limits and timeouts."""
    backends = []
    for url in urls:
        client = httpx.AsyncClient(
            base_url=url,
            limits=httpx.Limits(
                max_connections=config.max_connections,
                max_keepalive_connections=config.max_connections,
                keepalive_expiry=config.keepalive_expiry_s,
            ),
            timeout=httpx.Timeout(
                connect=config.connect_timeout_s,
                read=config.decode_timeout_s,
                write=config.connect_timeout_s,
                pool=config.connect_timeout_s,
            ),
            trust_env=False,
        )
        backends.append(Backend(role, url.rstrip("/"), client))
    return BackendPool(role, backends)
