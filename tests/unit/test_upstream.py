"""One leg (`upstream.py`): every failure becomes an `UpstreamError` whose client message names
the role and what happened, never a backend address; a 4xx keeps its status and body."""

from __future__ import annotations

import asyncio

import httpx
import orjson
import pytest

from di_router.router.backends import Backend
from di_router.router.upstream import (
    Leg,
    Progress,
    UpstreamError,
    _status_error,
    normalise_error_body,
)
from di_router.wire.errors import error_body
from di_router.wire.sse import DONE_EVENT, encode_event
from tests.unit.mock_backend import Call, Handler, MockBackend, Part, respond, sse

URL = "http://10.1.2.3:8100"
VLLM_ERROR = {"object": "error", "message": "bad prompt", "type": "BadRequestError",
              "param": None, "code": 400}  # fmt: skip


@pytest.mark.parametrize(
    "body", [VLLM_ERROR, {"error": {"message": "nested", "type": "x"}}], ids=["vllm", "openai"]
)
def test_openai_error_bodies_kept_as_they_are(body: dict[str, object]) -> None:
    assert normalise_error_body(400, orjson.dumps(body)) == body


@pytest.mark.parametrize(
    ("status", "raw", "message"),
    [
        (401, b'{"error": "Unauthorized"}', "Unauthorized"),  # vLLM's --api-key answer
        (500, b"Internal Server Error", "Internal Server Error"),
        (502, b"", "upstream answered HTTP 502"),
        (404, b'{"detail": "Not Found"}', "Not Found"),
        (500, b"[1, 2]", "[1, 2]"),
        (503, b"\xff\xfe oops", "\ufffd\ufffd oops"),
    ],
)
def test_other_bodies_wrapped_in_openai_format(status: int, raw: bytes, message: str) -> None:
    assert normalise_error_body(status, raw) == error_body(status, message)


def test_long_text_body_is_cut() -> None:
    body = normalise_error_body(500, b"x" * 10_000)
    assert body["message"] == "x" * 500


@pytest.mark.parametrize("status", [400, 404, 413, 422, 429])
def test_4xx_keeps_status_and_body(status: int) -> None:
    error = _status_error("decode", status, orjson.dumps({**VLLM_ERROR, "code": status}), None)
    assert (error.status, error.error_type, error.role) == (status, f"http_{status}", "decode")
    assert error.body == {**VLLM_ERROR, "code": status}
    assert error.rejected and not error.never_arrived


@pytest.mark.parametrize(
    ("status", "message"),
    [
        (500, "prefill server failed with HTTP 500: engine died"),
        (503, "prefill server failed with HTTP 503: engine died"),
        (520, "prefill server failed with HTTP 520: engine died"),
        (204, "prefill server answered HTTP 204 instead of 200: engine died"),
        (302, "prefill server answered with a redirect (HTTP 302): engine died"),
    ],
)
def test_other_statuses_are_a_502_naming_the_role(status: int, message: str) -> None:
    raw = b'{"object": "error", "message": "engine died", "code": 500}'
    error = _status_error("prefill", status, raw, f"{URL}/elsewhere")
    assert (error.status, error.error_type) == (502, f"http_{status}")
    assert error.body == error_body(502, message)
    assert error.detail == f"Location: {URL}/elsewhere"  # for the log only
    assert "10.1.2.3" not in error.message


def test_backend_message_is_cut_and_absent_one_omitted() -> None:
    empty = _status_error("decode", 500, b"", None).message
    assert empty.startswith("decode server failed with HTTP 500")
    long = _status_error("decode", 500, b'{"error": {"message": "' + b"m" * 1000 + b'"}}', None)
    assert long.message == "decode server failed with HTTP 500: " + "m" * 300


# -- a leg against an in-process backend ---------------------------------------------------------


def backend_with(handler: Handler) -> tuple[Backend, MockBackend]:
    """A leg never uses the probe client; one on the mock transport holds nothing to close."""
    mock = MockBackend(handler)
    probe = httpx.AsyncClient(transport=mock, trust_env=False)
    return Backend("prefill", URL, transport=mock, probe=probe, healthy=True), mock


def leg(backend: Backend, max_event_bytes: int = 1 << 20) -> Leg:
    return Leg(backend, "/v1/completions", b"{}", {"X-Request-Id": "abc"}, 5.0, max_event_bytes)


def progress(one: Leg) -> Progress:
    return one.progress


def raising(exc: Exception) -> Handler:
    async def handler(call: Call) -> httpx.Response:
        raise exc

    return handler


def streaming(*parts: Part) -> Handler:
    async def handler(call: Call) -> httpx.Response:
        return sse(call, parts)

    return handler


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("exc", "status", "error_type", "what"),
    [
        (httpx.ConnectError("refused"), 502, "connect_error", "refused the connection"),
        (httpx.ConnectTimeout("slow"), 504, "connect_timeout", "did not accept a connection"),
    ],
)
async def test_never_connected(exc: Exception, status: int, error_type: str, what: str) -> None:
    backend, _ = backend_with(raising(exc))
    one = leg(backend)
    with pytest.raises(UpstreamError) as info:
        await one.response()
    error = info.value
    assert (error.status, error.error_type, error.never_arrived) == (status, error_type, True)
    assert error.message.startswith(f"prefill server {what}")
    assert URL not in error.message and URL in error.detail
    assert not backend.healthy  # passive ejection until a health check readmits it
    await one.aclose()
    assert backend.outstanding == 0


@pytest.mark.anyio
async def test_error_status_body_read_and_closed_once() -> None:
    async def handler(call: Call) -> httpx.Response:
        return respond(call, 400, VLLM_ERROR)

    backend, mock = backend_with(handler)
    one = leg(backend)
    with pytest.raises(UpstreamError) as info:
        await one.response()
    assert (info.value.status, info.value.body) == (400, VLLM_ERROR)
    assert one.progress is Progress.SENT and one.error is info.value
    with pytest.raises(UpstreamError):  # the same error again, nothing re-read
        await one.response()
    await one.aclose()
    await one.aclose()
    assert [b.closes for b in mock.bodies] == [1]
    assert backend.outstanding == 0


@pytest.mark.anyio
async def test_events_in_batches_then_none_after_done() -> None:
    backend, mock = backend_with(
        streaming(b"data: 1\n\ndata: 2\n\n", b": ping\n\n", b"data: 3\n", b"\n" + DONE_EVENT)
    )
    one = leg(backend)
    assert await one.next_events() == [b"1", b"2"]
    assert progress(one) is Progress.EMITTED
    assert await one.next_events() == [b"3"]
    assert await one.next_events() is None
    assert progress(one) is Progress.FINISHED
    assert await one.next_events() is None
    await one.aclose()
    assert [b.closes for b in mock.bodies] == [1]


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("parts", "status", "error_type", "message"),
    [
        ([encode_event(b"1")], 502, "stream_cut", "prefill server closed the stream early"),
        ([b"data: " + b"x" * 2000], 502, "too_large", "prefill server sent an event is larger"),
        ([httpx.ReadTimeout("quiet")], 504, "timeout", "prefill server stopped answering mid"),
        ([httpx.RemoteProtocolError("rst")], 502, "protocol_error", "prefill server broke the"),
    ],
    ids=["cut", "too-large", "silent", "broken"],
)
async def test_stream_failures(
    parts: list[Part], status: int, error_type: str, message: str
) -> None:
    backend, mock = backend_with(streaming(*parts))
    one = leg(backend, max_event_bytes=1024)
    with pytest.raises(UpstreamError) as info:
        while await one.next_events() is not None:
            pass
    error = info.value
    assert (error.status, error.error_type) == (status, error_type)
    assert error.message.startswith(message)
    assert URL not in error.message
    await one.aclose()
    assert [b.closes for b in mock.bodies] == [1]


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("content", "error_type"),
    [(b"x" * 2000, "too_large"), (b"not json", "bad_response"), (b"[1]", "bad_response")],
)
async def test_whole_answer_failures(content: bytes, error_type: str) -> None:
    async def handler(call: Call) -> httpx.Response:
        return respond(call, 200, content)

    backend, mock = backend_with(handler)
    one = leg(backend)
    with pytest.raises(UpstreamError) as info:
        await one.json(1024)
    assert (info.value.status, info.value.error_type) == (502, error_type)
    await one.aclose()
    assert [b.closes for b in mock.bodies] == [1]


@pytest.mark.anyio
async def test_closing_a_pending_leg_cuts_the_request() -> None:
    never = asyncio.Event()
    reached = asyncio.Event()

    async def handler(call: Call) -> httpx.Response:
        reached.set()
        await never.wait()
        raise AssertionError("unreachable")

    backend, _ = backend_with(handler)
    one = leg(backend)
    await reached.wait()
    assert backend.outstanding == 1
    await one.aclose()
    assert one.dispatched.cancelled()
    assert backend.outstanding == 0
