"""Issue 3, point 7: errors are honest, and no path hangs.

Each test asserts what the client gets, what the simulators saw (their counters) and that no
request is left in flight (router gauge 0, sim slots free or accounted for by a pinned KV entry).
"""

from __future__ import annotations

import signal
import time
from typing import Any

import httpx
import pytest

from tests.router.conftest import (
    in_flight,
    is_openai_error,
    metric,
    wait_idle,
)
from tests.sse_strict import parse_sse
from tests.support import MODEL, di_stack, sim_stats, wait_until

CONNECT_TIMEOUT = 1.0


def completion(prompt: str = "hello there", **extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "prompt": prompt, "max_tokens": 4, "temperature": 0, **extra}


def post(url: str, body: dict[str, Any], stream: bool, timeout: float = 30) -> httpx.Response:
    """POST and read the whole body (streamed or not)."""
    return httpx.post(url + "/v1/completions", json={**body, "stream": stream}, timeout=timeout)


# -- 1. upstream error before the first byte ---------------------------------------------------

PREFILL_MAX_LEN, DECODE_MAX_LEN = 64, 44


@pytest.fixture(scope="module")
def reject():
    """Decode has a smaller context than prefill, so some prompts only decode refuses.

    Prefill takes 1 s so a decode rejection always arrives while prefill is still working.
    """
    with di_stack(
        prefill_extra=["--max-model-len", str(PREFILL_MAX_LEN), "--sim-prefill-base-ms", "1000"],
        decode_extra=["--max-model-len", str(DECODE_MAX_LEN), "--sim-kv-timeout", "5"],
    ) as s:
        yield s


@pytest.mark.parametrize("stream", [False, True])
def test_prompt_too_long_keeps_upstream_status_and_body(reject, stream):
    body = completion(" ".join(["word"] * 100))
    before = {s: sim_stats(s) for s in reject.sims}
    got = post(reject.router.url, body, stream)
    err = is_openai_error(got, 400)
    assert "maximum context length" in err["message"]
    # The body is one of the backends' own error bodies, unchanged.
    direct = [
        httpx.post(reject.prefill.url + "/v1/completions", json={**body, "max_tokens": 1}).json(),
        httpx.post(reject.decode.url + "/v1/completions", json=body).json(),
    ]
    assert err in direct
    stats = wait_idle(reject.router, *reject.sims)
    for s in reject.sims:  # rejected before reaching the engine: nothing to abort
        assert stats[s]["aborted"] == before[s]["aborted"]
    assert stats[reject.prefill]["kv"] == before[reject.prefill]["kv"]


@pytest.mark.parametrize("stream", [False, True])
def test_unknown_model_is_404(reject, stream):
    got = post(reject.router.url, {**completion(), "model": "no-such-model"}, stream)
    err = is_openai_error(got, 404)
    assert "no-such-model" in err["message"]
    assert got.headers["X-Request-Id"].startswith("cmpl-")
    wait_idle(reject.router, *reject.sims)


def _released(s, before: dict[str, Any]) -> dict[str, Any]:
    """Wait until the prefill's entry for the refused request was pulled and nothing is held."""

    def done() -> dict[str, Any] | None:
        after = sim_stats(s.prefill)
        kv = after["kv"]
        made = kv["produced"] - before["kv"]["produced"]
        ok = made == 1 and kv["pulled"] - before["kv"]["pulled"] == 1 and kv["pending"] == 0
        return after if ok and after["slots_in_use"] == 0 else None

    return wait_until(done, 8, "the prefill KV entry released by the router")


@pytest.mark.parametrize("stream", [False, True])
def test_decode_only_rejection_reaches_client_and_releases_prefill_kv(reject, stream):
    """Only decode refuses (its context is smaller): the client gets decode's 400 at once.

    Prefill is still computing when decode's 400 arrives. The router does not wait for it, but
    lets it finish in the background and then pulls its KV entry with a one-token decode
    request under the same X-Request-Id: on Neuron V0 nothing else would ever free that slot.
    """
    # 41 prompt tokens: with 1 token (prefill, and the release) they fit both; with 4, not decode
    body = completion(" ".join(["word"] * 40))
    before = sim_stats(reject.prefill)
    releases = metric(reject.router, "di_router_kv_releases_total", outcome="released")
    start = time.monotonic()
    got = post(reject.router.url, body, stream)
    elapsed = time.monotonic() - start
    err = is_openai_error(got, 400)
    assert err == httpx.post(reject.decode.url + "/v1/completions", json=body).json()
    assert f"maximum context length is {DECODE_MAX_LEN}" in err["message"]
    assert elapsed < 0.8, f"the router waited {elapsed:.2f}s for prefill before answering"
    after = _released(reject, before)
    assert after["aborted"] == before["aborted"] and after["kv"]["expired"] == 0
    wait_idle(reject.router, *reject.sims)
    assert metric(reject.router, "di_router_kv_releases_total", outcome="released") == releases + 1


@pytest.fixture(scope="module")
def reject_fast_prefill():
    """As `reject`, but prefill is instant (it finishes before decode's 400 reaches the router)
    and unpulled KV entries expire after 1 s."""
    with di_stack(
        prefill_extra=["--max-model-len", str(PREFILL_MAX_LEN), "--sim-kv-entry-ttl", "1"],
        decode_extra=["--max-model-len", str(DECODE_MAX_LEN), "--sim-kv-timeout", "5"],
    ) as s:
        yield s


@pytest.mark.parametrize("stream", [False, True])
def test_decode_only_rejection_after_prefill_finished_releases_kv(reject_fast_prefill, stream):
    """Prefill already produced its entry: the router's one-token pull frees it (no TTL here)."""
    s = reject_fast_prefill
    before = sim_stats(s.prefill)
    got = post(s.router.url, completion(" ".join(["word"] * 40)), stream)
    if got.status_code == 200:
        # Prefill's token was first, and it goes out at once: decode's refusal ends the stream.
        assert stream
        err = parse_sse(got.content)[-1]["error"]
        assert err["code"] == 400
    else:
        err = is_openai_error(got, 400)
    assert f"maximum context length is {DECODE_MAX_LEN}" in err["message"]
    _released(s, before)
    wait_idle(s.router, s.prefill, s.decode)
    assert sim_stats(s.prefill)["kv"]["expired"] == before["kv"]["expired"]


def test_prompt_decode_cannot_hold_pins_kv_until_ttl(reject_fast_prefill):
    """A prompt longer than decode's whole context: decode also refuses the one-token pull, so
    nothing can free the entry (Neuron V0 has no API for it); only the simulator's TTL does.
    The router reports it as a failed release."""
    s = reject_fast_prefill
    before = sim_stats(s.prefill)
    failed = metric(s.router, "di_router_kv_releases_total", outcome="failed")
    got = post(s.router.url, completion(" ".join(["word"] * 50)), stream=False)  # 51 > 44
    is_openai_error(got, 400)
    wait_until(
        lambda: metric(s.router, "di_router_kv_releases_total", outcome="failed") == failed + 1,
        5, "the failed release counted",
    )  # fmt: skip
    stats = wait_idle(s.router, s.prefill, s.decode)
    kv, was = stats[s.prefill]["kv"], before["kv"]
    assert kv["produced"] - was["produced"] == kv["expired"] - was["expired"] == 1
    assert kv["pulled"] == was["pulled"]


# -- 2. a backend that refuses connections -----------------------------------------------------


@pytest.fixture(scope="module")
def dead_prefill():
    with di_stack(
        prefill_extra=None,
        decode_extra=["--sim-kv-timeout", "30"],
        router_extra=["--connect-timeout", str(CONNECT_TIMEOUT)],
    ) as s:
        yield s


@pytest.fixture(scope="module")
def dead_decode():
    with di_stack(
        prefill_extra=["--sim-prefill-base-ms", "800"],
        decode_extra=None,
        router_extra=["--connect-timeout", str(CONNECT_TIMEOUT)],
    ) as s:
        yield s


@pytest.mark.parametrize("stream", [False, True])
def test_dead_prefill_is_502_and_decode_is_kept_for_a_rescue(dead_prefill, stream):
    """Decode accepted the request and waits for KV that will not come: on Neuron it cannot be
    aborted, so the router keeps it and re-sends prefill (with backoff) until the prefill
    server answers; the client gets its 502 at once."""
    router = dead_prefill.router
    rescues = metric(router, "di_router_prefill_rescues_total", outcome="attempted")
    start = time.monotonic()
    got = post(router.url, completion(), stream)
    elapsed = time.monotonic() - start
    err = is_openai_error(got, 502)
    assert elapsed < CONNECT_TIMEOUT + 2
    assert "prefill" in err["message"]
    assert dead_prefill.prefill.url not in err["message"]  # backend addresses stay in the log
    wait_until(
        lambda: metric(router, "di_router_prefill_rescues_total", outcome="attempted")
        == rescues + 1,
        5, "the rescue counted",
    )  # fmt: skip
    assert httpx.get(router.url + "/ready").json()["orphaned_decodes"] >= 1
    assert metric(router, "di_router_orphaned_decodes") >= 1
    upstream = metric(
        router, "di_router_upstream_errors_total", role="prefill", error_type="connect_error"
    )
    assert upstream >= 1


@pytest.mark.parametrize("stream", [False, True])
def test_dead_decode_is_502_and_prefill_is_not_cancelled(dead_decode, stream):
    """Prefill is never cancelled before its token (on Neuron that can strand a decode slot);
    decode never took the request, so the router tries to pull the KV entry itself."""
    prefill, router = dead_decode.prefill, dead_decode.router
    before = sim_stats(prefill)
    failed = metric(router, "di_router_kv_releases_total", outcome="failed")
    start = time.monotonic()
    got = post(router.url, completion(), stream)
    elapsed = time.monotonic() - start
    err = is_openai_error(got, 502)
    assert "decode" in err["message"] and dead_decode.decode.url not in err["message"]
    # Answered at once, not after the 800 ms prefill.
    assert elapsed < 0.6, f"502 took {elapsed:.2f}s"
    wait_until(
        lambda: metric(router, "di_router_kv_releases_total", outcome="failed") == failed + 1,
        15, "the failed release counted",
    )  # fmt: skip
    after = sim_stats(prefill)
    assert after["aborted"] == before["aborted"]
    assert after["kv"]["produced"] == before["kv"]["produced"] + 1
    assert in_flight(router) == 0


def test_models_with_dead_decode_is_502(dead_decode):
    got = httpx.get(dead_decode.router.url + "/v1/models", timeout=CONNECT_TIMEOUT + 5)
    err = is_openai_error(got, 502)
    assert "decode" in err["message"] and dead_decode.decode.url not in err["message"]


def test_readiness_reports_the_dead_backend(dead_prefill, dead_decode):
    for s, dead_role in ((dead_prefill, "prefill"), (dead_decode, "decode")):
        got = httpx.get(s.router.url + "/ready")
        assert got.status_code == 503
        report = got.json()
        assert report["ready"] is False
        assert report[dead_role] == {getattr(s, dead_role).url: "down"}
        live = "decode" if dead_role == "prefill" else "prefill"
        assert report[live] == {getattr(s, live).url: "up"}


# -- 3. failure after streaming began ----------------------------------------------------------


@pytest.fixture()
def slow_decode():
    """Its own stack: the test kills the decode server."""
    with di_stack(decode_extra=["--sim-decode-base-ms", "50"]) as s:
        yield s


def test_decode_dies_mid_stream_ends_stream_with_error_event(slow_decode):
    router = slow_decode.router
    errors_before = metric(router, "di_router_upstream_errors_total", role="decode")
    raw = b""
    with httpx.stream(
        "POST",
        router.url + "/v1/completions",
        json={**completion(max_tokens=200), "stream": True},
        timeout=10,
    ) as response:
        assert response.status_code == 200
        chunks = response.iter_raw()
        while raw.count(b"\n\n") < 4:
            raw += next(chunks)
        slow_decode.decode.stop(signal.SIGKILL)
        start = time.monotonic()
        for chunk in chunks:
            raw += chunk
        assert time.monotonic() - start < 5
    payloads = parse_sse(raw)  # ends with exactly one [DONE]
    assert "error" in payloads[-1], payloads[-1]
    error = payloads[-1]["error"]
    assert error["object"] == "error" and error["code"] == 502
    assert "decode" in error["message"]
    assert all("error" not in p for p in payloads[:-1])
    tokens = sum(len(p["choices"]) for p in payloads[:-1])
    assert 3 <= tokens < 200
    wait_until(
        lambda: (
            metric(router, "di_router_upstream_errors_total", role="decode") == errors_before + 1
        ),
        5,
        "decode upstream error counted",
    )
    # The prefill side is clean: its KV entry was pulled before the decode server died.
    stats = wait_idle(router, slow_decode.prefill)
    assert stats[slow_decode.prefill]["kv"]["pulled"] == 1


# -- 4. every wait is bounded ------------------------------------------------------------------


@pytest.fixture(scope="module")
def stuck_prefill():
    with di_stack(
        prefill_extra=["--sim-prefill-base-ms", "2500"],
        router_extra=["--prefill-timeout", "0.5"],
    ) as s:
        yield s


@pytest.fixture(scope="module")
def stuck_decode():
    with di_stack(
        decode_extra=["--sim-decode-base-ms", "2000"],
        router_extra=["--decode-timeout", "0.5"],
    ) as s:
        yield s


@pytest.mark.parametrize("stream", [False, True])
def test_prefill_timeout_is_504_and_the_pair_is_rescued(stuck_prefill, stream):
    """The client gets its 504 on time. Decode waits for KV (on Neuron it cannot be aborted).
    A streamed prefill past its headers is in its engine: the router reads it on in the
    background rather than abort it (an abort could race its entry, and a second request under
    the same id beside it ends a Neuron producer's engine). A non-streamed one may not be: it
    is aborted and sent again. Either way the KV comes, decode emits, and both servers end
    with nothing held."""
    prefill, decode, router = stuck_prefill.prefill, stuck_prefill.decode, stuck_prefill.router
    before = {s: sim_stats(s) for s in stuck_prefill.sims}
    rescues = "di_router_prefill_rescues_total"
    rescued = metric(router, rescues, outcome="succeeded")
    start = time.monotonic()
    got = post(router.url, completion(), stream)
    elapsed = time.monotonic() - start
    err = is_openai_error(got, 504)
    assert "prefill" in err["message"]
    assert elapsed < 1.8, f"504 took {elapsed:.2f}s"
    stats = wait_idle(router, *stuck_prefill.sims, timeout=10)
    aborted = 0 if stream else 1
    assert stats[prefill]["aborted"] == before[prefill]["aborted"] + aborted
    kv = stats[prefill]["kv"]
    assert kv["produced"] == kv["pulled"] == before[prefill]["kv"]["produced"] + 1
    assert stats[decode]["slots_in_use"] == 0  # decode got its KV and finished or was aborted
    assert metric(router, "di_router_upstream_errors_total", error_type="timeout") >= 1
    assert metric(router, rescues, outcome="succeeded") - rescued == (0 if stream else 1)


def test_decode_stall_mid_stream_ends_with_error_event(stuck_decode):
    before = sim_stats(stuck_decode.decode)
    start = time.monotonic()
    got = post(stuck_decode.router.url, completion(max_tokens=8), stream=True)
    elapsed = time.monotonic() - start
    assert got.status_code == 200
    payloads = parse_sse(got.content)
    assert "error" in payloads[-1], payloads
    assert payloads[-1]["error"]["code"] == 504
    assert "decode" in payloads[-1]["error"]["message"]
    assert elapsed < 1.5, f"stream ended after {elapsed:.2f}s"
    stats = wait_idle(stuck_decode.router, *stuck_decode.sims)
    assert stats[stuck_decode.decode]["aborted"] == before["aborted"] + 1


def test_decode_stall_unary_is_504(stuck_decode):
    """The client's deadline holds. Decode, read as a stream, had sent its headers (it is in
    its engine) but no token: it is held until it emits (past its KV wait), then closed, which
    aborts it rather than letting it run to its end."""
    before = sim_stats(stuck_decode.decode)
    start = time.monotonic()
    got = post(stuck_decode.router.url, completion(max_tokens=2), stream=False)
    elapsed = time.monotonic() - start
    err = is_openai_error(got, 504)
    assert "decode" in err["message"]
    assert elapsed < 1.5, f"504 took {elapsed:.2f}s"
    stats = wait_idle(stuck_decode.router, *stuck_decode.sims, timeout=10)
    assert stats[stuck_decode.decode]["aborted"] == before["aborted"] + 1
    assert in_flight(stuck_decode.router) == 0
