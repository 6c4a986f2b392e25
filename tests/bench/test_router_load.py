"""The issue-8 benchmark's parts over real sockets: the zero backend speaks the protocol the router
needs, the floor relays it byte for byte, and the lean client counts what it must."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest

from di_router.bench.stack import Server
from tests.support import free_port, router_argv, running

BENCH = Path(__file__).parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH))
from load_client import client_session, closed_loop, completion_body  # noqa: E402


def zero(name: str, *extra: str) -> Server:
    port = free_port()
    argv = [sys.executable, str(BENCH / "zero_backend.py"), "--port", str(port), *extra]
    return Server(name, argv, f"http://127.0.0.1:{port}")


@pytest.fixture(scope="module")
def procs() -> Iterator[dict[str, Server]]:
    prefill, decode = zero("prefill"), zero("decode", "--token-delay-ms", "5")
    floor_port, router_port = free_port(), free_port()
    floor_argv = [sys.executable, str(BENCH / "passthrough_floor.py"), "--port", str(floor_port)]
    floor = Server(
        "floor", [*floor_argv, "--upstream", decode.url], f"http://127.0.0.1:{floor_port}"
    )
    p_port, d_port = (int(s.url.rsplit(":", 1)[1]) for s in (prefill, decode))
    router = Server(
        "router", router_argv(router_port, p_port, d_port), f"http://127.0.0.1:{router_port}"
    )
    with running(prefill, decode, floor, router):  # in order: backends up before the router
        router.wait_ready("/ready")
        yield {"prefill": prefill, "decode": decode, "floor": floor, "router": router}


def events(response: httpx.Response) -> list[bytes]:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    raw = response.content
    assert raw.endswith(b"data: [DONE]\n\n")
    return [e.removeprefix(b"data: ") for e in raw.split(b"\n\n") if e][:-1]


def test_zero_backend_speaks_vllm_streams(procs):
    body = {"model": "m", "prompt": "a b c", "max_tokens": 3, "stream": True}
    body["stream_options"] = {"include_usage": True}
    url = procs["prefill"].url
    reply = httpx.post(url + "/v1/completions", json=body, headers={"X-Request-Id": "abc"})
    chunks = [orjson.loads(e) for e in events(reply)]
    assert {c["id"] for c in chunks} == {"cmpl-abc"}
    assert [c["choices"][0]["text"] for c in chunks[:-1]] == ["tok0 ", "tok1 ", "tok2 "]
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-1]] == [None, None, "length"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 3
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "stream": True}
    chunks = [orjson.loads(e) for e in events(httpx.post(url + "/v1/chat/completions", json=chat))]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [c["choices"][0]["delta"]["content"] for c in chunks[1:]] == ["tok0 ", "tok1 "]
    whole = httpx.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 2}).json()
    assert whole["choices"][0]["text"] == "tok0 tok1 " and whole["usage"]["prompt_tokens"] == 2
    bad = httpx.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 0})
    assert bad.status_code == 400 and bad.json()["param"] == "max_tokens"


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_router_merges_zero_backends_token_exact(procs, path):
    body: dict[str, object] = {"model": "llama-3.3-70b", "max_tokens": 5, "stream": True}
    body |= {"messages": [{"role": "user", "content": "hi"}]} if "chat" in path else {"prompt": "x"}
    direct = events(httpx.post(procs["decode"].url + path, json=body))
    routed = events(httpx.post(procs["router"].url + path, json=body, timeout=10))

    def content(raw: list[bytes]) -> list[object]:
        choices = [orjson.loads(e)["choices"][0] for e in raw]
        return [c.get("text", c.get("delta")) for c in choices]

    assert content(routed) == content(direct)  # decode's repeated first token dropped


def test_floor_relays_bytes_as_sent(procs):
    body = {"prompt": "x", "max_tokens": 4, "stream": True}
    direct = events(httpx.post(procs["decode"].url + "/v1/completions", json=body))
    relayed = events(httpx.post(procs["floor"].url + "/v1/completions", json=body))
    strip = [orjson.loads(e) | {"id": "", "created": 0} for e in direct]
    assert [orjson.loads(e) | {"id": "", "created": 0} for e in relayed] == strip


def test_client_counts_successes_and_catches_wrong_streams(procs):
    async def run(tokens_expected: int) -> tuple[int, int, int]:
        async with client_session(4) as session:
            result = await closed_loop(
                session,
                procs["router"].url + "/v1/completions",
                completion_body(6, "llama-3.3-70b"),
                tokens_expected,
                concurrency=4,
                requests=12,
            )
        return result.ok, result.errors, len(result.ttfts_s)

    assert asyncio.run(run(6)) == (12, 0, 12)
    assert asyncio.run(run(7)) == (0, 12, 0)  # one token missing is an error, not a success
