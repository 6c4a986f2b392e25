"""The aiohttp-backed transport's error mapping (`transport.py`): the router's messages depend on
telling "never connected" from "broke mid-stream", so each aiohttp error must land on the
right httpx class, with the OS error kept for the descriptor check."""

from __future__ import annotations

import errno
import types

import aiohttp
import httpx
import pytest

from di_router.router.backends import Backend
from di_router.router.transport import _mapped_errors
from di_router.router.upstream import Leg, UpstreamError
from tests.unit.mock_backend import Call, MockBackend

KEY = types.SimpleNamespace(host="10.0.0.1", port=8100, ssl=True)


def refused(code: int) -> aiohttp.ClientConnectorError:
    return aiohttp.ClientConnectorError(KEY, OSError(code, "os error"))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("raised", "mapped"),
    [
        (aiohttp.ConnectionTimeoutError(), httpx.ConnectTimeout),
        (aiohttp.SocketTimeoutError(), httpx.ReadTimeout),
        (refused(errno.ECONNREFUSED), httpx.ConnectError),
        (aiohttp.ClientPayloadError("truncated"), httpx.RemoteProtocolError),
        (aiohttp.ServerDisconnectedError(), httpx.RemoteProtocolError),
        (aiohttp.ClientOSError(errno.ECONNRESET, "reset"), httpx.ReadError),
        (aiohttp.ClientError("other"), httpx.ReadError),
        (ConnectionResetError(errno.ECONNRESET, "reset while writing"), httpx.ReadError),
    ],
    ids=["connect-timeout", "read-timeout", "refused", "payload", "disconnected", "client-os",
         "client-error", "os-error"],
)  # fmt: skip
def test_each_aiohttp_error_maps_to_its_httpx_class(
    raised: Exception, mapped: type[httpx.HTTPError]
) -> None:
    with pytest.raises(mapped) as info, _mapped_errors():
        raise raised
    assert type(info.value) is mapped
    assert info.value.__cause__ is raised
    assert str(info.value)


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("code", "status", "error_type"),
    [(errno.EMFILE, 503, "no_descriptors"), (errno.ENFILE, 503, "no_descriptors"),
     (errno.ECONNREFUSED, 502, "connect_error")],
)  # fmt: skip
async def test_running_out_of_descriptors_is_told_apart(
    code: int, status: int, error_type: str
) -> None:
    """The router's own descriptor shortage is a 503, not a backend refusing (a 502)."""

    async def handler(call: Call) -> httpx.Response:
        with _mapped_errors():
            raise refused(code)
        raise AssertionError("unreachable")

    mock = MockBackend(handler)
    probe = httpx.AsyncClient(transport=mock, trust_env=False)
    backend = Backend("decode", "http://10.0.0.1:8100", transport=mock, probe=probe)
    leg = Leg(backend, "/v1/completions", b"{}", {}, 5.0, 1024)
    with pytest.raises(UpstreamError) as info:
        await leg.response()
    assert (info.value.status, info.value.error_type) == (status, error_type)
    assert info.value.never_arrived
    await leg.aclose()


@pytest.mark.anyio
async def test_bytes_that_arrived_with_a_broken_connection_are_not_lost() -> None:
    """aiohttp drops what was buffered once the payload fails; the transport hands it over
    first. An event sent just before a cut decides whether a server has a slot to free."""
    import asyncio

    from di_router.router.transport import AiohttpTransport

    async def cut(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        event = b"data: {}\n\n"
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
            b"transfer-encoding: chunked\r\n\r\n" + b"%x\r\n" % len(event) + event + b"\r\n"
        )
        await writer.drain()
        writer.close()  # the chunked body never ends

    server = await asyncio.start_server(cut, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    transport = AiohttpTransport(4, 1.0, None)
    try:
        request = httpx.Request("POST", f"http://127.0.0.1:{port}/v1/completions", content=b"{}")
        response = await transport.handle_async_request(request)
        content = response.stream._response.content  # type: ignore[union-attr]
        for _ in range(200):  # bounded: until aiohttp has seen the cut (and set its error)
            if content.exception() is not None:
                break
            await asyncio.sleep(0.005)
        assert content.exception() is not None
        stream = response.stream.__aiter__()  # type: ignore[union-attr]
        assert await anext(stream) == b"data: {}\n\n"
        with pytest.raises(httpx.RemoteProtocolError):
            await anext(stream)
    finally:
        await transport.aclose()
        server.close()
