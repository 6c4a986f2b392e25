"""Helpers shared by the router tests: whole stacks (sims + router) and server-side state."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.support import Proc, free_port, running, sim_stats, start_router, start_sim, wait_until

ROUTER_BASE_FLAGS = ("--health-interval", "0.2")


@dataclass
class Stack:
    prefill: Proc | DeadBackend
    decode: Proc | DeadBackend
    router: Proc

    @property
    def sims(self) -> list[Proc]:
        return [p for p in (self.prefill, self.decode) if isinstance(p, Proc)]


@dataclass
class DeadBackend:
    """A backend address where nothing listens (connections are refused)."""

    url: str

    @classmethod
    def make(cls) -> DeadBackend:
        return cls(f"http://127.0.0.1:{free_port()}")


@contextlib.contextmanager
def make_stack(
    prefill_extra: Sequence[str] | None = (),
    decode_extra: Sequence[str] | None = (),
    router_extra: Sequence[str] = (),
    env: dict[str, str] | None = None,
) -> Iterator[Stack]:
    """A prefill sim, a decode sim and a router; `None` for a role means a dead backend.

    Waits for the router's /ready when both backends are alive.
    """
    kv_port = free_port()
    prefill: Proc | DeadBackend = (
        DeadBackend.make()
        if prefill_extra is None
        else start_sim("prefill", kv_port=kv_port, extra=prefill_extra)
    )
    decode: Proc | DeadBackend = (
        DeadBackend.make()
        if decode_extra is None
        else start_sim("decode", kv_port=kv_port, extra=decode_extra)
    )
    router = start_router(prefill, decode, extra=[*ROUTER_BASE_FLAGS, *router_extra], env=env)  # type: ignore[arg-type]
    procs = [p for p in (prefill, decode) if isinstance(p, Proc)]
    with running(*procs, router):
        if len(procs) == 2:
            router.wait_ready("/ready", timeout=15)
        yield Stack(prefill, decode, router)


def metric(router: Proc, name: str, **labels: str) -> float:
    """Sum of the samples of `name` (exact sample name) whose labels include `labels`."""
    text = httpx.get(router.url + "/metrics", timeout=5).text
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def in_flight(router: Proc) -> float:
    return metric(router, "di_router_requests_in_flight")


def wait_idle(router: Proc, *sims: Proc, pinned: dict[Proc, int] | None = None,
              timeout: float = 10) -> dict[Proc, dict[str, Any]]:
    """No request left in flight: router gauge 0 and each sim's slots all free, except the
    `pinned` slots held by unpulled KV entries (then `kv.pending` must account for them)."""
    pinned = pinned or {}

    def idle() -> dict[Proc, dict[str, Any]] | None:
        if in_flight(router) != 0:
            return None
        stats = {s: sim_stats(s) for s in sims}
        for s, st in stats.items():
            held = pinned.get(s, 0)
            if st["slots_in_use"] != held or st["waiting"] or st["running"] or st["transferring"]:
                return None
            if "kv" in st and st["kv"]["pending"] != held:
                return None
        return stats

    return wait_until(idle, timeout, "router and sims idle")


def is_openai_error(response: httpx.Response, status: int) -> dict[str, Any]:
    """Assert an OpenAI-format JSON error with this status; returns the body."""
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/json"), response.headers
    body = response.json()
    assert body["object"] == "error", body
    assert body["code"] == status, body
    assert isinstance(body["message"], str) and body["message"], body
    assert isinstance(body["type"], str), body
    return body
