"""The KV side channel between a producer (prefill) and a consumer (decode).

Like NeuronConnector, the only key is the engine request id that both servers derive from the
shared `X-Request-Id`. The producer keeps an entry {engine id -> first token, KV tokens} and the
sequence's slot until a consumer pulls it; the consumer asks over TCP at `kv_ip:kv_port`. One
long-poll per pull replaces the real connector's busy REQ/REP retry loop; the outcome is the same.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import orjson

_CONNECT_RETRY_S = 0.05


@dataclass
class KVEntry:
    token_id: int
    num_tokens: int
    release: Callable[[], None]
    created: float = field(default_factory=time.monotonic)


@dataclass
class KVCounters:
    produced: int = 0
    pulled: int = 0
    expired: int = 0
    pull_timeouts: int = 0


class KVPullTimeoutError(Exception):
    """No producer entry appeared for the engine id within the consumer's timeout."""


class KVEntryStore:
    """Producer side: finished prefills waiting to be pulled, each pinning one slot."""

    def __init__(self, entry_ttl_s: float, transfer_seconds: Callable[[int], float]) -> None:
        self._entries: dict[str, KVEntry] = {}
        self._arrivals: dict[str, asyncio.Event] = {}
        self._entry_ttl_s = entry_ttl_s
        self._transfer_seconds = transfer_seconds
        self.counters = KVCounters()

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, engine_id: str, entry: KVEntry) -> None:
        self._entries[engine_id] = entry
        self.counters.produced += 1
        if engine_id in self._arrivals:
            self._arrivals[engine_id].set()
        if self._entry_ttl_s > 0:
            asyncio.get_running_loop().call_later(self._entry_ttl_s, self._expire, engine_id, entry)

    def _expire(self, engine_id: str, entry: KVEntry) -> None:
        if self._entries.get(engine_id) is entry:
            del self._entries[engine_id]
            self.counters.expired += 1
            entry.release()

    async def take(self, engine_id: str, timeout: float) -> KVEntry | None:
        """Wait up to `timeout` for the entry, then hand it over; the slot frees after transfer."""
        if engine_id not in self._entries:
            arrival = self._arrivals.setdefault(engine_id, asyncio.Event())
            try:
                async with asyncio.timeout(timeout):
                    await arrival.wait()
            except TimeoutError:
                return None
            finally:
                self._arrivals.pop(engine_id, None)
        entry = self._entries.pop(engine_id, None)
        if entry is None:
            return None
        self.counters.pulled += 1
        delay = self._transfer_seconds(entry.num_tokens)
        asyncio.get_running_loop().call_later(delay, entry.release)
        return entry


class KVChannelServer:
    """Serves pulls from consumers on `kv_port` (the producer binds it, as NeuronConnector does)."""

    def __init__(self, store: KVEntryStore) -> None:
        self._store = store
        self._server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> None:
        self._server = await asyncio.start_server(self._handle, host, port)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = orjson.loads(await reader.readline())
            # Stop waiting if the consumer hangs up (its request was aborted).
            take = asyncio.ensure_future(
                self._store.take(request["request_id"], request["timeout"])
            )
            hangup = asyncio.ensure_future(reader.read(1))
            await asyncio.wait((take, hangup), return_when=asyncio.FIRST_COMPLETED)
            hangup.cancel()
            if not take.done():
                take.cancel()
                return
            entry = take.result()
            reply = (
                {"ok": False}
                if entry is None
                else {"ok": True, "token_id": entry.token_id, "num_tokens": entry.num_tokens}
            )
            writer.write(orjson.dumps(reply) + b"\n")
            await writer.drain()
        except (ConnectionError, ValueError, KeyError, TypeError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


async def pull_entry(host: str, port: int, engine_id: str, timeout: float) -> tuple[int, int]:
    """Consumer side: (first token id, KV tokens) for `engine_id`, or KVPullTimeoutError."""
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise KVPullTimeoutError(engine_id)
        try:
            async with asyncio.timeout(remaining):
                reader, writer = await asyncio.open_connection(host, port)
        except TimeoutError:
            raise KVPullTimeoutError(engine_id) from None
        except OSError:
            # The producer is not up (yet): the real connector also waits for its peer.
            await asyncio.sleep(min(_CONNECT_RETRY_S, max(remaining, 0)))
            continue
        try:
            request = {"request_id": engine_id, "timeout": remaining}
            writer.write(orjson.dumps(request) + b"\n")
            await writer.drain()
            async with asyncio.timeout(remaining + 5):
                line = await reader.readline()
        except (TimeoutError, ConnectionError):
            raise KVPullTimeoutError(engine_id) from None
        finally:
            writer.close()
        reply = orjson.loads(line) if line else {"ok": False}
        if not reply["ok"]:
            raise KVPullTimeoutError(engine_id)
        return int(reply["token_id"]), int(reply["num_tokens"])
