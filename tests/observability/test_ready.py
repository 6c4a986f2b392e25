"""Issue 4, health: /ready follows the backends (polled in the background); /health does not.

The decode server is stopped, then a new one is started at the same address: /ready goes 503
naming decode as down, then back to 200, and `di_router_backend_up{role="decode"}` follows.
"""

from __future__ import annotations

from typing import Any

import httpx

from tests.observability.conftest import scrape, value
from tests.support import MODEL, di_stack, start_sim, wait_until


def probe(url: str) -> tuple[int, dict[str, Any], float, float]:
    """(/ready status, /ready body, decode's backend_up, prefill's backend_up); /health is 200."""
    health = httpx.get(url + "/health", timeout=2)
    assert health.status_code == 200, health.text  # liveness never depends on the backends
    ready = httpx.get(url + "/ready", timeout=2)
    text = scrape(url)
    return (
        ready.status_code,
        ready.json(),
        value(text, "di_router_backend_up", role="decode"),
        value(text, "di_router_backend_up", role="prefill"),
    )


def test_ready_follows_decode_server_down_and_up():
    with di_stack() as stack:
        url, decode_url, prefill_url = stack.router.url, stack.decode.url, stack.prefill.url
        status, body, decode_up, prefill_up = probe(url)
        assert status == 200 and body["ready"] is True, body
        assert body["decode"] == {decode_url: "up"} and body["prefill"] == {prefill_url: "up"}
        assert (decode_up, prefill_up) == (1, 1)

        stack.decode.stop()
        down = wait_until(lambda: (p := probe(url))[0] == 503 and p, 5, "/ready 503")
        _, body, decode_up, prefill_up = down
        assert body["ready"] is False
        assert body["decode"] == {decode_url: "down"}, body
        assert body["prefill"] == {prefill_url: "up"}, body
        wait_until(lambda: probe(url)[2] == 0, 5, "backend_up{role=decode} 0")
        assert probe(url)[3] == 1

        port = int(decode_url.rsplit(":", 1)[1])
        again = start_sim("decode", kv_port=stack.kv_port, port=port)
        try:
            again.wait_ready()
            up = wait_until(lambda: (p := probe(url))[0] == 200 and p, 5, "/ready 200 again")
            assert up[1] == {
                "ready": True,
                "prefill": {prefill_url: "up"},
                "decode": {decode_url: "up"},
                "draining": False,
                "orphaned_decodes": 0,
            }
            wait_until(lambda: probe(url)[2] == 1, 5, "backend_up{role=decode} 1")

            # The new decode server really serves: a DI request goes through.
            r = httpx.post(
                url + "/v1/completions",
                timeout=30,
                json={"model": MODEL, "prompt": "back again", "max_tokens": 3},
            )
            assert r.status_code == 200, r.text
            assert r.json()["usage"]["completion_tokens"] == 3
        finally:
            again.stop()
