"""Backend pools: "the prefill server" and "the decode server" are picks from these."""

from __future__ import annotations

import itertools
import random
import ssl
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import httpx

from di_router.router.config import RouterConfig
from di_router.router.transport import Http1Transport

T = TypeVar("T")
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
    outstanding: int = 0
    """Legs in flight on this backend (the load that selection balances)."""
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
    """The backends of one role."""

    def __init__(self, role: str, backends: list[Backend]) -> None:
        self.role = role
        self.backends = backends

    def usable(self, exclude: Collection[Backend] = ()) -> list[Backend]:
        """Backends that are up; if none is, every one not excluded (a health check may
        simply not have run yet, and a refused connection answers fast)."""
        allowed = [b for b in self.backends if b not in exclude]
        return [b for b in allowed if b.state == "up"] or allowed

    async def aclose(self) -> None:
        for backend in self.backends:
            await backend.aclose()


class NoBackends(Exception):
    """A role has no backend at all (discovery has found none yet, or all left)."""

    def __init__(self, role: str) -> None:
        super().__init__(f"no {role} server is registered")
        self.role = role


class Selection:
    """Which prefill and which decode serve a request.

    `static` pairs the i-th prefill with the i-th decode and picks a pair, never the two
    halves apart: a Neuron 2.24 decode server pulls KV only from the one producer it paired
    with at startup. `any` picks each role on its own (vLLM V1 NIXL, Neuron 2.26 discovery).
    Within that, `least_outstanding` takes the less loaded of two random candidates (power of
    two choices: near-best balance without a global scan); `round_robin` takes turns.
    """

    def __init__(
        self, prefill: BackendPool, decode: BackendPool, pairing: str, policy: str, seed: int = 0
    ) -> None:
        if pairing == "static" and len(prefill.backends) != len(decode.backends):
            raise ValueError(
                "static pairing needs as many prefill as decode servers (the i-th with the i-th)"
            )
        self.prefill = prefill
        self.decode = decode
        self.pairing = pairing
        self._policy = policy
        self._turns = {"pair": itertools.count(), "prefill": itertools.count(),
                       "decode": itertools.count()}  # fmt: skip
        self._rng = random.Random(seed)

    def pick(self, exclude: Collection[Backend] = ()) -> tuple[Backend, Backend]:
        prefills, decodes = self.prefill.backends, self.decode.backends
        if len(prefills) == 1 and len(decodes) == 1:  # one pair: nothing to choose
            return prefills[0], decodes[0]
        for pool in (self.prefill, self.decode):
            if not pool.backends:
                raise NoBackends(pool.role)
        if self.pairing == "static":
            pairs = list(zip(self.prefill.backends, self.decode.backends, strict=True))
            allowed = [p for p in pairs if p[0] not in exclude and p[1] not in exclude]
            candidates = [p for p in allowed if p[0].state == p[1].state == "up"] or allowed
            if not candidates:
                candidates = pairs
            load = lambda p: p[0].outstanding + p[1].outstanding  # noqa: E731
            return self._choose("pair", candidates, load)
        prefill = self._choose("prefill", self.prefill.usable(exclude) or prefills, _load)
        decode = self._choose("decode", self.decode.usable(exclude) or decodes, _load)
        return prefill, decode

    def _choose(self, turn: str, candidates: Sequence[T], load: Callable[[T], int]) -> T:
        """Round robin keeps one turn per kind of pick (pairs, prefills, decodes): a shared
        one would lock two alternating picks into the same combination."""
        if self._policy == "round_robin" or len(candidates) == 1:
            return candidates[next(self._turns[turn]) % len(candidates)]
        a, b = self._rng.sample(candidates, 2)
        return a if load(a) <= load(b) else b


def _load(backend: Backend) -> int:
    return backend.outstanding


def make_backend(role: str, url: str, config: RouterConfig) -> Backend:
    """One backend: a traffic pool sized for the load, and a small probe pool of its own."""
    keepalive = config.keepalive_expiry_s
    tls = ssl.create_default_context(cafile=config.ssl_ca_file) if config.ssl_ca_file else None
    return Backend(
        role,
        url.rstrip("/"),
        transport=Http1Transport(config.max_connections, keepalive, tls),
        probe=httpx.AsyncClient(
            base_url=url,
            transport=Http1Transport(_HEALTH_CONNECTIONS, keepalive, tls),
            timeout=config.health_timeout_s,
            trust_env=False,
        ),
        connect_timeout=config.connect_timeout_s,
    )


def make_pool(role: str, urls: list[str], config: RouterConfig) -> BackendPool:
    return BackendPool(role, [make_backend(role, url, config) for url in urls])
