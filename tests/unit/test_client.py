"""The client's side over ASGI (`client.py`): a bounded body read, and a request task cancelled
when its client leaves, but not once the answer is complete."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from di_router.router.client import DISCONNECTED, BodyError, Client, ClientGone, Message

pytestmark = pytest.mark.anyio


class Peer:
    """An ASGI server's side: `messages` are received in order, then the receive waits."""

    def __init__(self, messages: Sequence[Message], headers: Sequence[tuple[bytes, bytes]] = ()):
        self._messages = list(messages)
        self.sent: list[Message] = []
        self.headers = list(headers)
        self.more = asyncio.Event()

    async def receive(self) -> Message:
        if self._messages:
            return self._messages.pop(0)
        await self.more.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: Message) -> None:
        self.sent.append(message)

    def client(self) -> Client:
        return Client({"headers": self.headers}, self.receive, self.send)


def part(body: bytes, more: bool) -> Message:
    return {"type": "http.request", "body": body, "more_body": more}


async def test_body_in_parts() -> None:
    peer = Peer([part(b"ab", True), part(b"", True), part(b"cd", False)])
    assert await peer.client().read_body(4, 1.0) == b"abcd"


async def test_body_over_the_limit_is_413_declared_or_not() -> None:
    declared = Peer([part(b"x", False)], [(b"content-length", b"5")])
    with pytest.raises(BodyError) as info:
        await declared.client().read_body(4, 1.0)
    assert info.value.status == 413
    streamed = Peer([part(b"abc", True), part(b"de", False)])
    with pytest.raises(BodyError) as info:
        await streamed.client().read_body(4, 1.0)
    assert (info.value.status, info.value.message) == (
        413,
        "The request body is larger than 4 bytes.",
    )


async def test_slow_body_is_408() -> None:
    peer = Peer([part(b"ab", True)])  # the rest never comes
    with pytest.raises(BodyError) as info:
        await peer.client().read_body(100, 0.05)
    assert info.value.status == 408


async def test_disconnect_while_reading_the_body() -> None:
    client = Peer([part(b"ab", True), {"type": "http.disconnect"}]).client()
    with pytest.raises(ClientGone):
        await client.read_body(100, 1.0)
    assert client.gone


async def test_leaving_cancels_the_task_and_nothing_more_is_sent() -> None:
    peer = Peer([])
    client = peer.client()
    cancelled: list[object] = []

    async def request() -> None:
        client.watch_disconnect(asyncio.current_task())  # type: ignore[arg-type]
        await client.start(200, [])
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError as exc:
            cancelled.append(exc.args[0] if exc.args else None)
            await client.write(b"late", last=True)
            raise

    task = asyncio.ensure_future(request())
    await asyncio.sleep(0)
    peer.more.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert cancelled == [DISCONNECTED]
    assert [m["type"] for m in peer.sent] == ["http.response.start"]  # not "late"


async def test_leaving_after_the_last_byte_cancels_nothing() -> None:
    peer = Peer([])
    client = peer.client()

    async def request() -> str:
        client.watch_disconnect(asyncio.current_task())  # type: ignore[arg-type]
        await client.respond(200, b"{}", [])
        peer.more.set()
        for _ in range(5):
            await asyncio.sleep(0)
        client.stop_watching()
        return "finished"

    assert await asyncio.wait_for(request(), 1) == "finished"
    assert client.gone and client.completed
