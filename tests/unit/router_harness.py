"""A whole `RouterApp` in the test's event loop: its backends are `MockBackend`s and requests
are plain ASGI calls, so a test controls every byte and every moment (including the client
leaving) without a socket. The health monitor does not run: backends start healthy."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

import orjson

from di_router.router.app import RouterApp
from di_router.router.client import Message
from di_router.router.config import RouterConfig
from tests.unit.mock_backend import Body, Handler, MockBackend


class AsgiClient:
    """One request: the body at the first `receive`, then `http.disconnect` once `leave` is
    set (as an ASGI server does when the connection closes); `send` records the answer."""

    def __init__(self, body: bytes) -> None:
        self._body: bytes | None = body
        self.leave = asyncio.Event()
        self.messages: list[Message] = []
        self.first_body = asyncio.Event()
        """Set when the first non-empty body message was sent."""

    async def receive(self) -> Message:
        if self._body is not None:
            body, self._body = self._body, None
            return {"type": "http.request", "body": body, "more_body": False}
        await self.leave.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: Message) -> None:
        self.messages.append(message)
        if message["type"] == "http.response.body" and message.get("body"):
            self.first_body.set()

    @property
    def status(self) -> int:
        (start,) = [m for m in self.messages if m["type"] == "http.response.start"]
        status: int = start["status"]
        return status

    @property
    def headers(self) -> dict[str, str]:
        (start,) = [m for m in self.messages if m["type"] == "http.response.start"]
        return {k.decode(): v.decode() for k, v in start["headers"]}

    @property
    def body(self) -> bytes:
        parts = [m for m in self.messages if m["type"] == "http.response.body"]
        assert parts and not parts[-1].get("more_body"), "the response was not completed"
        return b"".join(m["body"] for m in parts)

    def json(self) -> Any:
        return orjson.loads(self.body)


def scope(path: str, body: bytes, headers: Sequence[tuple[str, str]] = ()) -> dict[str, Any]:
    raw_headers = [(b"content-type", b"application/json"),
                   (b"content-length", str(len(body)).encode())]  # fmt: skip
    raw_headers += [(k.lower().encode(), v.encode()) for k, v in headers]
    return {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
        "root_path": "", "headers": raw_headers, "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }  # fmt: skip


class Router:
    """`pairs` (prefill handler, decode handler), paired by position like the CLI's URLs."""

    def __init__(self, pairs: Sequence[tuple[Handler, Handler]], **config: Any) -> None:
        prefill_urls = [f"http://prefill-{i}.test" for i in range(len(pairs))]
        decode_urls = [f"http://decode-{i}.test" for i in range(len(pairs))]
        self.app = RouterApp(
            RouterConfig(prefill_urls=prefill_urls, decode_urls=decode_urls, **config)
        )
        self.service = self.app.service
        self.prefills = [MockBackend(p) for p, _ in pairs]
        self.decodes = [MockBackend(d) for _, d in pairs]
        backends = [*self.service.prefill.backends, *self.service.decode.backends]
        for backend, mock in zip(backends, [*self.prefills, *self.decodes], strict=True):
            backend.transport = mock
            backend.healthy = True

    @property
    def prefill(self) -> MockBackend:
        return self.prefills[0]

    @property
    def decode(self) -> MockBackend:
        return self.decodes[0]

    def start(
        self, path: str, body: dict[str, Any] | bytes, headers: Sequence[tuple[str, str]] = ()
    ) -> tuple[AsgiClient, asyncio.Task[None]]:
        """The request as a task, for tests that act while it runs."""
        raw = body if isinstance(body, bytes) else orjson.dumps(body)
        client = AsgiClient(raw)
        task = asyncio.ensure_future(
            self.app(scope(path, raw, headers), client.receive, client.send)
        )
        return client, task

    async def post(
        self, path: str, body: dict[str, Any] | bytes, headers: Sequence[tuple[str, str]] = ()
    ) -> AsgiClient:
        client, task = self.start(path, body, headers)
        async with asyncio.timeout(5):
            await task
        return client

    def metric(self, name: str, **labels: str) -> float:
        return self.service.metrics.registry.get_sample_value(name, labels) or 0.0

    @property
    def bodies(self) -> list[Body]:
        return [b for mock in (*self.prefills, *self.decodes) for b in mock.bodies]

    async def settled(self) -> None:
        """Every exchange settled (bounded poll): every upstream response closed, exactly
        once; no leg outstanding, no decode held, nothing in flight."""
        backends = [*self.service.prefill.backends, *self.service.decode.backends]
        await until(
            lambda: (
                all(b.closes for b in self.bodies)
                and not any(b.outstanding for b in backends)
                and not self.service.settler.orphaned
            ),
            "every leg closed",
        )
        assert [b.closes for b in self.bodies] == [1] * len(self.bodies)
        assert self.metric("di_router_requests_in_flight") == 0
        assert self.metric("di_router_orphaned_decodes") == 0

    async def aclose(self) -> None:
        await self.service.stop()


async def until(predicate: Callable[[], Any], what: str, timeout: float = 5.0) -> None:
    """Bounded poll of in-process state."""
    try:
        async with asyncio.timeout(timeout):
            while not predicate():
                await asyncio.sleep(0.005)
    except TimeoutError:
        raise AssertionError(f"timed out after {timeout:g}s waiting for {what}") from None
