"""Shared servers and client helpers of the simulator tests (real processes, real sockets)."""

from __future__ import annotations

import concurrent.futures
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any

import httpx
import pytest

from tests.sse_strict import assemble, check_chunks, parse_sse
from tests.support import MODEL, Proc, free_port, kv_config, running, samples, scrape, start_sim

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"


def sim_proc(
    name: str,
    args: Sequence[str],
    env: dict[str, str] | None = None,
    module: str = "di_router.sim.api_server",
) -> Proc:
    """A simulator started with exactly `args` (plus a free `--port` unless one is given)."""
    argv = list(args)
    if "--port" not in argv:
        argv += ["--port", str(free_port())]
    port = argv[argv.index("--port") + 1]
    return Proc(name, [sys.executable, "-m", module, *argv], f"http://127.0.0.1:{port}", env)


def start_pair(
    prefill_extra: Sequence[str] = (), decode_extra: Sequence[str] = (), profile: str = "instant"
) -> tuple[Proc, Proc]:
    kv_port = free_port()
    return (
        start_sim("prefill", kv_port=kv_port, profile=profile, extra=prefill_extra),
        start_sim("decode", kv_port=kv_port, profile=profile, extra=decode_extra),
    )


@pytest.fixture(scope="session")
def trio() -> Iterator[tuple[Proc, Proc, Proc]]:
    """baseline, prefill, decode on the instant profile; other tests count by deltas."""
    prefill, decode = start_pair()
    with running(start_sim("baseline"), prefill, decode) as procs:
        yield procs  # type: ignore[misc]


# -- requests ------------------------------------------------------------------------------------
def completion_body(prompt: str | list[str], max_tokens: int, **extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **extra}


def chat_body(content: str, max_tokens: int, **extra: Any) -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0,
        **extra,
    }


def post(proc: Proc, path: str, body: dict[str, Any], rid: str | None = None) -> httpx.Response:
    headers = {"X-Request-Id": rid} if rid else {}
    return httpx.post(proc.url + path, json=body, headers=headers, timeout=30)


def stream(
    proc: Proc, path: str, body: dict[str, Any], rid: str | None = None
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Strictly parsed chunks and the assembled result of a streaming request."""
    resp = post(proc, path, {**body, "stream": True}, rid)
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"] == "text/event-stream; charset=utf-8"
    chunks = parse_sse(resp.content)
    chat = path == CHAT
    check_chunks(chunks, chat)
    return chunks, assemble(chunks, chat)


def texts(resp: httpx.Response) -> list[str]:
    """Generated text per choice of a non-streaming response."""
    assert resp.status_code == 200, resp.text
    return [
        c["message"]["content"] if "message" in c else c["text"] for c in resp.json()["choices"]
    ]


def paired(
    prefill: Proc,
    decode: Proc,
    path: str,
    body: dict[str, Any],
    rid: str,
    decode_rid: str | None = None,
) -> tuple[httpx.Response, httpx.Response]:
    """Prefill (max_tokens=1) and decode of one request sent concurrently with one X-Request-Id
    (or, with `decode_rid`, each with its own: Neuron 2.26 ids name the peer)."""
    one = {**body, "max_tokens": 1}
    one.pop("max_completion_tokens", None)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        d = pool.submit(post, decode, path, body, decode_rid or rid)
        p = pool.submit(post, prefill, path, one, rid)
        return p.result(), d.result()


def timed_events(
    proc: Proc, path: str, body: dict[str, Any], rid: str | None = None, on_event: Any = None
) -> tuple[float, list[float], bytes]:
    """(send time, client-clock arrival time of every SSE event, raw body) of one stream.

    `on_event(n)` is called after the n-th event (1-based) arrives, e.g. to start other load.
    """
    headers = {"X-Request-Id": rid} if rid else {}
    arrivals: list[float] = []
    raw = b""
    with httpx.Client(timeout=30) as client:
        sent = time.monotonic()
        with client.stream(
            "POST", proc.url + path, json={**body, "stream": True}, headers=headers
        ) as resp:
            assert resp.status_code == 200
            for data in resp.iter_raw():
                now = time.monotonic()
                raw += data
                while raw.count(b"\n\n") > len(arrivals):
                    arrivals.append(now)
                    if on_event is not None:
                        on_event(len(arrivals))
    return sent, arrivals, raw


def open_then_close(proc, path: str, body: dict, events: int, rid: str | None = None) -> bytes:
    """Open a stream, read `events` SSE events (0: headers only), then drop the connection."""
    raw = b""
    headers = {"X-Request-Id": rid} if rid else {}
    with (
        httpx.Client(timeout=30) as client,
        client.stream(
            "POST", proc.url + path, json={**body, "stream": True}, headers=headers
        ) as resp,
    ):
        assert resp.status_code == 200
        if events:
            for data in resp.iter_raw():
                raw += data
                if raw.count(b"\n\n") >= events:
                    break
    return raw


# -- observation ---------------------------------------------------------------------------------
def metrics(proc: Proc) -> dict[str, float]:
    """Every sample of /metrics by name (labels dropped: one model per server)."""
    return {s.name: s.value for s in samples(scrape(proc.url)) if "le" not in s.labels}


__all__ = [
    "CHAT",
    "COMPLETIONS",
    "MODEL",
    "chat_body",
    "completion_body",
    "kv_config",
    "metrics",
    "open_then_close",
    "paired",
    "post",
    "sim_proc",
    "start_pair",
    "stream",
    "texts",
    "timed_events",
]
