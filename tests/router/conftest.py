"""Helpers shared by the router tests: whole stacks (sims + router) and server-side state."""

from __future__ import annotations

from typing import Any

import httpx

from tests.support import Proc, scrape, sim_stats, value, wait_until


def metric(router: Proc, name: str, **labels: str) -> float:
    """Sum of the samples of `name` (exact sample name) whose labels include `labels`."""
    return value(scrape(router.url), name, **labels)


def in_flight(router: Proc) -> float:
    return metric(router, "di_router_requests_in_flight")


def wait_idle(
    router: Proc, *sims: Proc, pinned: dict[Proc, int] | None = None, timeout: float = 10
) -> dict[Proc, dict[str, Any]]:
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
