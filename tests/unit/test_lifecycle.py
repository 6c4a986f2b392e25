"""One request from route to last byte (`lifecycle.py`), in process: a `RouterApp` whose
backends are scripted, driven by plain ASGI calls. Every test ends with every upstream
response closed exactly once, no leg outstanding and the in-flight gauge at 0."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import orjson
import pytest

from di_router.router import lifecycle
from tests.sse_strict import assemble, check_chunks, parse_sse
from tests.unit.chunks import answer
from tests.unit.mock_backend import Call, Handler, decode_stream, prefill_stream, respond, sse
from tests.unit.router_harness import Router, until

pytestmark = pytest.mark.anyio

ENGINE_DIED = {"object": "error", "message": "engine died", "type": "InternalServerError",
               "param": None, "code": 500}  # fmt: skip
BAD_REQUEST = {"object": "error", "message": "This model's maximum context length is 8",
               "type": "BadRequestError", "param": None, "code": 400}  # fmt: skip


def path_of(chat: bool) -> str:
    return "/v1/chat/completions" if chat else "/v1/completions"


def request(chat: bool, stream: bool, **fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "test-model", "max_tokens": 3, "stream": stream}
    if chat:
        body["messages"] = [{"role": "user", "content": "hi"}]
    else:
        body["prompt"] = "hi"
    return {**body, **fields}


def good_prefill(cue: asyncio.Event | None = None) -> Handler:
    """A prefill server; with `cue`, its token waits for it."""

    async def handler(call: Call) -> httpx.Response:
        if call.stream:
            return sse(call, [*([cue] if cue else []), *prefill_stream(call, "A")])
        if cue:
            await cue.wait()
        return respond(call, 200, answer(call.chat, call.client_id, "A"))

    return handler


def good_decode(tokens: str = "ABC", kv: asyncio.Event | None = None) -> Handler:
    """A decode server; with `kv`, it emits nothing (a stream) or sends no headers (a whole
    answer) before it is set: a decode waiting for its KV."""

    async def handler(call: Call) -> httpx.Response:
        if call.stream:
            return sse(call, decode_stream(call, tokens, kv))
        if kv:
            await kv.wait()
        return respond(call, 200, answer(call.chat, call.client_id, tokens))

    return handler


async def released_by_the_router(router: Router) -> None:
    """Prefill's KV entry was pulled by the router: decode's second request is prefill's own,
    one token, not streamed, under the same id."""
    release = await router.decode.call(1)
    first = router.prefill.calls[0]
    assert release.request_id == first.request_id
    expected = {**first.body, "stream": False, "max_tokens": 1}
    expected.pop("stream_options", None)
    assert release.body == expected
    await router.settled()
    assert router.metric("di_router_kv_releases_total", outcome="released") == 1


@pytest.fixture
async def make_router() -> AsyncIterator[Callable[..., Router]]:
    routers: list[Router] = []

    def make(*pairs: tuple[Handler, Handler], **config: Any) -> Router:
        routers.append(Router(pairs, **config))
        return routers[-1]

    yield make
    for router in routers:
        await router.aclose()


both = pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])


@both
@pytest.mark.parametrize("usage", [False, True], ids=["no-usage", "usage"])
async def test_streamed_answer_is_the_merged_stream(
    chat: bool, usage: bool, make_router: Callable[..., Router]
) -> None:
    router = make_router((good_prefill(), good_decode()))
    body = request(chat, True, stream_options={"include_usage": usage})
    client = await router.post(path_of(chat), body)
    assert client.status == 200
    assert client.headers["content-type"].startswith("text/event-stream")
    chunks = parse_sse(client.body)
    check_chunks(chunks, chat)
    got = assemble(chunks, chat)
    assert (got["text"], got["finish"]) == ({0: "ABC"}, {0: "length"})
    assert (got["usage"] or {}).get("completion_tokens") == (3 if usage else None)
    # One id: the client's is vLLM's name for the bare hex both legs were sent.
    prefill, decode = router.prefill.calls[0], router.decode.calls[0]
    assert prefill.request_id == decode.request_id
    assert {c["id"] for c in chunks} == {decode.client_id}
    assert client.headers["x-request-id"] == "cmpl-" + decode.request_id  # chat too
    assert decode.request.content == orjson.dumps(body)  # the client's bytes, unchanged
    assert prefill.body == {**body, "max_tokens": 1, "stream_options": {"include_usage": True}}
    await router.settled()
    assert router.metric("di_router_requests_total", model_name="unknown",
                         endpoint="chat" if chat else "completions", status="200") == 1  # fmt: skip
    assert router.metric("di_router_prompt_tokens_total", model_name="unknown") == 3


@both
async def test_whole_answer_is_decodes_under_the_clients_id(
    chat: bool, make_router: Callable[..., Router]
) -> None:
    router = make_router((good_prefill(), good_decode()))
    client = await router.post(path_of(chat), request(chat, False))
    assert client.status == 200
    got = client.json()
    decode = router.decode.calls[0]
    expected = answer(chat, decode.client_id, "ABC")
    assert got == {**expected, "created": got["created"]}
    assert got["created"] != expected["created"]  # the router's clock, one value per request
    assert router.prefill.calls[0].body["max_tokens"] == 1
    # Decode is read as a stream (it tells when decode took the request and left its KV wait);
    # the answer is rebuilt from it, field for field as vLLM sends it whole.
    assert decode.body == {**request(chat, False), "stream": True,
                           "stream_options": {"include_usage": True}}  # fmt: skip
    assert list(got) == list(expected)
    assert list(got["choices"][0]) == list(expected["choices"][0])
    await router.settled()


@pytest.mark.parametrize(
    ("chat", "fields"),
    [
        (False, {"logprobs": 2}),
        (True, {"logprobs": True, "top_logprobs": 2}),
        (True, {"tools": [{"type": "function", "function": {"name": "f"}}]}),
        (False, {"stream_options": {"include_usage": True}}),
        (False, {"echo": True}),
    ],
    ids=["logprobs", "chat-logprobs", "tools", "stream_options", "echo"],
)
async def test_whole_answer_keeps_the_clients_body_where_a_stream_would_differ(
    chat: bool, fields: dict[str, Any], make_router: Callable[..., Router]
) -> None:
    """Logprobs' offsets and tool calls differ between vLLM's two forms, a completions echo
    fails as a stream, and `stream_options` without `stream` is vLLM's 400 to give: decode
    gets the client's body as it came."""
    router = make_router((good_prefill(), good_decode()))
    body = request(chat, False, **fields)
    client = await router.post(path_of(chat), body)
    assert client.status == 200
    assert router.decode.calls[0].request.content == orjson.dumps(body)
    await router.settled()


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "whole"])
async def test_decode_without_headers_at_its_deadline_is_closed_and_prefills_kv_released(
    stream: bool, make_router: Callable[..., Router]
) -> None:
    """vLLM sends a stream's headers before it adds the request to its engine: a decode
    without them at the decode timeout never took the request, so prefill's entry is
    stranded: the router closes decode and pulls the entry itself."""
    never = asyncio.Event()

    async def decode(call: Call) -> httpx.Response:
        if call.number == 0:
            await never.wait()  # too busy to read the request
        return respond(call, 200, answer(call.chat, call.client_id, "A"))

    router = make_router((good_prefill(), decode), decode_timeout_s=0.3)
    client = await router.post("/v1/completions", request(False, stream))
    if stream:
        assert client.status == 200
        assert b"decode server sent no token within 0.3s" in client.body
    else:
        assert client.status == 504
        assert "decode server did not answer within 0.3s" in client.json()["message"]
    await released_by_the_router(router)


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "whole"])
async def test_decode_silent_past_its_headers_is_held_until_it_emits_never_released(
    stream: bool, make_router: Callable[..., Router]
) -> None:
    """A decode that sent its headers is in its engine: queued for a slot (it will pull and
    emit), or past its pull and stalled. A release would wait in `transferring` for good in
    the second case, so decode is held (open) until it emits, then closed (aborted)."""
    kv = asyncio.Event()
    router = make_router((good_prefill(), good_decode(kv=kv)), decode_timeout_s=0.3)
    client = await router.post("/v1/completions", request(False, stream))
    assert client.status == (200 if stream else 504)
    await until(lambda: router.metric("di_router_orphaned_decodes") == 1, "decode held")
    assert router.decode.bodies[0].closes == 0
    kv.set()
    await router.settled()
    assert len(router.decode.calls) == 1
    assert router.metric("di_router_kv_releases_total", outcome="released") == 0


async def test_bad_input_is_an_openai_error_and_reaches_no_backend(
    make_router: Callable[..., Router],
) -> None:
    router = make_router((good_prefill(), good_decode()))
    cases: list[tuple[dict[str, Any] | bytes, str | None, str]] = [
        (b"{not json", None, "The request body is not valid JSON"),
        (b"[1]", None, "The request body must be a JSON object."),
        (request(False, True, n=2), "n", "n > 1 is not supported"),
        (request(False, True, max_tokens=0), None, "max_tokens must be at least 1, got 0."),
        ({**request(False, True), "stream": "maybe"}, "stream", "stream: "),
    ]
    for body, param, message in cases:
        client = await router.post("/v1/completions", body)
        error = client.json()
        assert (client.status, error["code"], error["param"]) == (400, 400, param), error
        assert error["object"] == "error" and error["message"].startswith(message), error
    assert router.prefill.calls == router.decode.calls == []
    await router.settled()


async def test_api_key_and_what_goes_upstream(make_router: Callable[..., Router]) -> None:
    router = make_router(
        (good_prefill(), good_decode()), api_keys=["client-key"], backend_api_key="backend-key"
    )
    refused = await router.post("/v1/completions", request(False, False))
    assert (refused.status, refused.headers["www-authenticate"]) == (401, "Bearer")
    parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    headers = [("Authorization", "Bearer client-key"), ("traceparent", parent),
               ("Cookie", "session=1"), ("X-Request-Id", "client-chosen")]  # fmt: skip
    client = await router.post("/v1/completions", request(False, False), headers)
    assert client.status == 200
    for call in (router.prefill.calls[0], router.decode.calls[0]):
        sent = call.request.headers
        assert sent["authorization"] == "Bearer backend-key"
        assert sent["traceparent"] == parent
        assert "cookie" not in sent
        assert sent["x-request-id"] != "client-chosen"
    await router.settled()


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "whole"])
async def test_decode_refusing_first_gives_its_error_and_prefills_kv_is_released(
    stream: bool, make_router: Callable[..., Router]
) -> None:
    """Decode's 400 arrives before prefill's token: the client gets it at once, whatever
    prefill does; prefill's KV, made for a decode that will never pull it, is pulled by a
    one-token decode request under the same id."""
    prefill_go = asyncio.Event()

    async def decode(call: Call) -> httpx.Response:
        if call.number == 0:
            return respond(call, 400, BAD_REQUEST)
        return respond(call, 200, answer(call.chat, call.client_id, "A"))

    router = make_router((good_prefill(prefill_go), decode))
    client, task = router.start("/v1/completions", request(False, stream))
    await until(lambda: client.messages and not client.messages[-1]["more_body"], "the answer")
    assert (client.status, client.json()) == (400, BAD_REQUEST)
    prefill_go.set()
    async with asyncio.timeout(5):
        await task
    await released_by_the_router(router)


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "whole"])
async def test_prefill_failing_gives_its_error_and_is_rescued_on_the_same_server(
    stream: bool, make_router: Callable[..., Router]
) -> None:
    """Decode accepted and waits for KV that the failed prefill never made: the settler sends
    the same prefill request (same X-Request-Id, same bytes) to the same server, and holds
    decode until it emits (past the KV wait, so closing it aborts it)."""
    kvs = [asyncio.Event(), asyncio.Event()]

    def prefill(kv: asyncio.Event) -> Handler:
        async def handler(call: Call) -> httpx.Response:
            if call.number == 0:
                return respond(call, 500, ENGINE_DIED)
            kv.set()  # the KV exists now: decode can pull it
            return await good_prefill()(call)

        return handler

    pairs = [(prefill(kv), good_decode(kv=kv)) for kv in kvs]
    router = make_router(*pairs, selection="round_robin")
    client = await router.post("/v1/completions", request(False, stream))
    assert client.status == 502
    assert client.json()["message"] == "prefill server failed with HTTP 500: engine died"
    assert "prefill-0.test" not in client.body.decode()
    rescue = await router.prefills[0].call(1)
    first = router.prefills[0].calls[0]
    assert (rescue.request_id, rescue.request.content) == (first.request_id, first.request.content)
    await router.settled()
    assert router.prefills[1].calls == router.decodes[1].calls == []
    assert router.decode.bodies[0].closes == 1
    for outcome in ("attempted", "succeeded"):
        assert (
            router.metric("di_router_prefill_rescues_total", outcome=outcome, reason="http_500")
            == 1
        )


async def test_client_leaving_before_the_first_token_is_499_decode_held_until_it_emits(
    make_router: Callable[..., Router],
) -> None:
    prefill_go, kv = asyncio.Event(), asyncio.Event()
    router = make_router((good_prefill(prefill_go), good_decode(kv=kv)))
    client, task = router.start("/v1/completions", request(False, True))
    await router.decode.call(0)
    await router.prefill.call(0)
    client.leave.set()
    async with asyncio.timeout(5):
        await task
    assert client.messages == []  # nothing was sent: the client had gone
    assert router.metric("di_router_requests_total", model_name="unknown",
                         endpoint="completions", status="499") == 1  # fmt: skip
    assert router.metric("di_router_client_disconnects_total", model_name="unknown") == 1
    assert router.metric("di_router_requests_in_flight") == 0
    # Prefill is never cut before its token (rule 1); decode may still be waiting for its KV:
    # it cannot be aborted yet, so it is held until it emits.
    assert router.prefill.bodies[0].closes == 0
    prefill_go.set()
    await until(lambda: router.metric("di_router_orphaned_decodes") == 1, "decode held")
    assert router.decode.bodies[0].closes == 0
    kv.set()
    await router.settled()
    assert len(router.prefill.calls) == 1  # prefill had produced: nothing to rescue


async def test_client_leaving_before_the_first_token_is_recorded_at_once(
    make_router: Callable[..., Router],
) -> None:
    prefill_go, kv = asyncio.Event(), asyncio.Event()
    router = make_router((good_prefill(prefill_go), good_decode(kv=kv)))
    client, task = router.start("/v1/completions", request(False, True))
    await router.prefill.call(0)
    client.leave.set()
    try:
        await asyncio.wait_for(asyncio.shield(task), lifecycle._PREFILL_TAIL_S / 2)
    finally:
        prefill_go.set()
        kv.set()
        await task
        await router.settled()


async def test_client_leaving_after_the_first_token_holds_decode_until_it_emits(
    make_router: Callable[..., Router],
) -> None:
    """The client has prefill's token and leaves while decode still waits for the KV."""
    kv = asyncio.Event()
    router = make_router((good_prefill(), good_decode(kv=kv)))
    client, task = router.start("/v1/completions", request(False, True))
    await client.first_body.wait()
    client.leave.set()
    async with asyncio.timeout(5):
        await task
    assert router.metric("di_router_requests_total", model_name="unknown",
                         endpoint="completions", status="499") == 1  # fmt: skip
    await until(lambda: router.metric("di_router_orphaned_decodes") == 1, "decode held")
    assert router.decode.bodies[0].closes == 0
    kv.set()
    await router.settled()


async def test_client_leaving_mid_stream_closes_decode_at_once(
    make_router: Callable[..., Router],
) -> None:
    never = asyncio.Event()

    async def decode(call: Call) -> httpx.Response:
        parts = decode_stream(call, "ABCD")
        return sse(call, [*parts[:2], never, *parts[2:]])  # A (repeated), B, then silence

    router = make_router((good_prefill(), decode))
    client, task = router.start("/v1/completions", request(False, True, max_tokens=4))
    await until(lambda: b'"B"' in b"".join(m.get("body", b"") for m in client.messages), "B")
    client.leave.set()
    async with asyncio.timeout(5):
        await task
    assert router.metric("di_router_requests_total", model_name="unknown",
                         endpoint="completions", status="499") == 1  # fmt: skip
    await router.settled()  # decode had emitted: closed at once, `never` is never set


async def test_refused_pair_is_retried_on_another_under_a_new_id(
    make_router: Callable[..., Router],
) -> None:
    """Nothing reached prefill-0: the request moves to pair 1 under a new id; pair 0's decode,
    which did accept, is settled by rescuing its prefill."""
    kv0 = asyncio.Event()

    async def refusing_then_up(call: Call) -> httpx.Response:
        if call.number == 0:
            raise httpx.ConnectError("connection refused")
        kv0.set()
        return await good_prefill()(call)

    router = make_router(
        (refusing_then_up, good_decode(kv=kv0)), (good_prefill(), good_decode()),
        selection="round_robin",
    )  # fmt: skip
    client = await router.post("/v1/completions", request(False, False))
    assert client.status == 200
    moved = router.decodes[1].calls[0]
    assert client.json()["id"] == moved.client_id == client.headers["x-request-id"]
    assert moved.request_id != router.decodes[0].calls[0].request_id
    await router.settled()
    assert router.prefills[0].calls[1].request_id == router.decodes[0].calls[0].request_id


async def test_refused_rescue_gives_up_and_the_settle_timeout_bounds_the_hold(
    make_router: Callable[..., Router],
) -> None:
    """Prefill fails, then refuses the rescue (a 4xx is final): decode may wait for KV that
    will never come, so it is held, but only for the settle timeout."""

    async def prefill(call: Call) -> httpx.Response:
        return respond(call, 500 if call.number == 0 else 400, ENGINE_DIED)

    router = make_router((prefill, good_decode(kv=asyncio.Event())), settle_timeout_s=0.2)
    client = await router.post("/v1/completions", request(False, True))
    assert client.status == 502
    await router.prefill.call(1)
    await router.settled()
    assert len(router.prefill.calls) == 2
    assert (
        router.metric("di_router_prefill_rescues_total", outcome="given_up", reason="http_400") == 1
    )
    assert (
        router.metric("di_router_prefill_rescues_total", outcome="succeeded", reason="http_500")
        == 0
    )


async def test_decode_failing_mid_stream_ends_the_stream_with_an_error_event(
    make_router: Callable[..., Router],
) -> None:
    """Headers are gone: the failure is told in the stream, which still ends with [DONE]."""

    async def decode(call: Call) -> httpx.Response:
        parts = decode_stream(call, "ABC")
        return sse(call, [*parts[:2], b'data: {"choices": [1]}\n\n'])  # A, B, then garbage

    router = make_router((good_prefill(), decode))
    client = await router.post("/v1/completions", request(False, True))
    assert client.status == 200
    *tokens, error, done = client.body.split(b"\n\n")[:-1]
    assert [orjson.loads(t[6:])["choices"][0]["text"] for t in tokens] == ["A", "B"]
    assert orjson.loads(error[6:]) == {"error": {
        "object": "error", "message": "decode failed mid-stream: decode server sent a malformed "
        "event", "type": "BadGatewayError", "param": None, "code": 502}}  # fmt: skip
    assert done == b"data: [DONE]"
    await router.settled()
    assert router.metric("di_router_upstream_errors_total", model_name="unknown",
                         role="decode", error_type="bad_response") == 1  # fmt: skip
