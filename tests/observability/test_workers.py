"""Issue 4: with several Hypercorn workers (Prometheus multiprocess mode) metrics add up.

Each worker keeps its own values in PROMETHEUS_MULTIPROC_DIR; whichever worker answers a scrape
must report the sum over all of them, exactly as one process would.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.observability.conftest import (
    by_label,
    promtool,
    promtool_check,
    samples,
    scrape,
    value,
    wait_settled,
)
from tests.support import MODEL, di_stack, wait_until

MAX_TOKENS = 3
BATCH = 8


def request(url: str, i: int) -> dict:
    # A new connection per request, so the kernel hands requests to either worker.
    r = httpx.post(
        url + "/v1/completions",
        headers={"Connection": "close"},
        timeout=30,
        json={
            "model": MODEL,
            "prompt": f"request number {i}",
            "max_tokens": MAX_TOKENS,
            "temperature": 0,
        },
    )
    assert r.status_code == 200, r.text
    return r.json()["usage"]


def workers_with_requests(metrics_dir: Path) -> int:
    """Processes that have counted a request: each writes its own counter file."""
    return len(list(metrics_dir.glob("counter_*.db")))


def test_two_workers_add_up(tmp_path):
    metrics_dir = tmp_path / "prom"
    metrics_dir.mkdir()
    with di_stack(
        decode_extra=["--sim-decode-base-ms", "20"],
        router_extra=["--workers", "2"],
        env={"PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)},
    ) as stack:
        url = stack.router.url
        wait_until(
            lambda: len(list(metrics_dir.glob("gauge_livesum_*.db"))) == 2,
            15,
            "two workers started",
        )
        sent, prompt, generated = 0, 0, 0
        with ThreadPoolExecutor(BATCH) as pool:
            # Concurrent batches until both workers have answered some (bounded).
            for _ in range(25):
                for usage in pool.map(lambda i: request(url, i), range(sent, sent + BATCH)):
                    prompt += usage["prompt_tokens"]
                    generated += usage["completion_tokens"]
                sent += BATCH
                if workers_with_requests(metrics_dir) == 2:
                    break
        assert workers_with_requests(metrics_dir) == 2, "one worker answered every request"

        wait_settled(stack.router, sent)
        # Every scrape, whichever worker answers it, sees the same sums.
        for _ in range(6):
            again = scrape(url)
            assert value(again, "di_router_requests_total") == sent
            assert value(again, "di_router_e2e_request_latency_seconds_count") == sent
            assert value(again, "di_router_prompt_tokens_total") == prompt
            assert value(again, "di_router_generation_tokens_total") == generated
        assert generated == sent * MAX_TOKENS

        # A request held open is in flight for every scrape, whichever worker serves it.
        stream_body = {"model": MODEL, "prompt": "a long one", "max_tokens": 500, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=stream_body, timeout=30) as held:
            assert held.status_code == 200
            chunks = held.iter_raw()  # kept: a dropped iterator would close the response
            next(chunks)
            for _ in range(6):
                assert value(scrape(url), "di_router_requests_in_flight") == 1
        # Leaving the block hung up: a client disconnect, and nothing left in flight.
        text = wait_settled(stack.router, sent + 1)
        assert value(text, "di_router_client_disconnects_total") == 1
        assert by_label(text, "di_router_requests_total", "endpoint", "status") == {
            ("completions", "200"): sent,
            ("completions", "499"): 1,
        }
        assert value(text, "di_router_prefill_latency_seconds_count") == sent + 1
        assert value(text, "di_router_e2e_request_latency_seconds_bucket", le="+Inf") == sent + 1
        assert value(text, "di_router_time_to_first_token_seconds_count") == 1
        assert value(text, "di_router_generation_tokens_total") > generated  # + the held one's
        assert value(text, "di_router_requests_in_flight") == 0
        # One series per backend (not one per worker), each up.
        up = [s for s in samples(text) if s.name == "di_router_backend_up"]
        assert sorted((s.labels["role"], s.labels["backend"], s.value) for s in up) == [
            ("decode", stack.decode.url, 1.0),
            ("prefill", stack.prefill.url, 1.0),
        ]
        assert all("pid" not in s.labels for s in samples(text)), "per-worker series leaked"
        if promtool() is None:
            pytest.skip("promtool is not installed (apt-get install prometheus)")
        check = promtool_check(text)
        assert check.returncode == 0, check.stdout + check.stderr
