"""The KV side channel between one producer (prefill) and one consumer (decode), over TCP.

It follows Neuron's connector (`vllm/distributed/kv_transfer/neuron/neuron_buffer.py`,
`NeuronBuffer.__init__`, `send_handler`, `recv_handler` on branch neuron-2.24-vllm-v0.7.2):
- Pairing: the producer binds `kv_port` and waits for a consumer's hello; the consumer connects
  to `kv_ip:kv_port` and waits for the answer; both exchange their neuron_core_offset. Neither
  side has a timeout (ZMQ REP/REQ `recv` without one), so a consumer pointed at the wrong address
  waits forever; `SimServer` binds HTTP only once paired, as vLLM does (`init_device` runs first).
- One producer pairs with one consumer; a second consumer is refused and keeps waiting. (The
  fork's REP socket would take its hello for a lookup and its send thread would die.)
- A lookup is keyed by the engine request id only. A lookup for an entry that does not exist
  yet is retried without end (`recv_handler` re-queues it); here the producer holds the lookup
  until the entry appears, one message instead of a busy loop, with the same outcome.
Any-to-any (vLLM V1 NIXL, Neuron 2.26 with etcd): a producer serves every consumer that asks,
and a consumer keeps one client per producer it pulls from (`KVPeers`). A V1 lookup names blocks
that exist or not: a missing entry is answered at once (`KVMissing`) instead of waited for.
Departure: when the peer's connection drops (a server restarted), the producer accepts a new
consumer and the consumer pairs again, re-sending its pending lookups. In the fork a REQ/REP pair
cannot recover (the REQ socket waits forever for the lost reply): both servers need a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from di_router.sim.clock import Clock

log = logging.getLogger("di_router.sim.kv")

RETRY_S = 0.1
CONNECT_TIMEOUT_S = 5.0
WAIT_LOG_INTERVAL_S = 5.0


class KVMissing(Exception):
    """The producer has no such entry (never made, already pulled, or expired)."""


@dataclass
class KVEntry:
    token_id: int
    num_tokens: int
    release: Callable[[], None]
    """Called once the KV left the producer (pulled and transferred) or expired."""


@dataclass
class KVCounters:
    produced: int = 0
    pulled: int = 0
    expired: int = 0


@dataclass
class KVEntryStore:
    """Producer side: prefilled KV by engine id, waiting for the consumer's lookup."""

    clock: Clock
    entry_ttl_s: float
    transfer_seconds: Callable[[int], float]
    counters: KVCounters = field(default_factory=KVCounters)
    on_shared_id: Callable[[str], None] | None = None
    """Neuron 2.24: called when an entry is pulled while another request under its id waits
    in `transferring` (see `put`)."""
    _entries: dict[str, KVEntry] = field(default_factory=dict)
    _waiters: dict[str, list[asyncio.Future[None]]] = field(default_factory=dict)
    _shared: set[str] = field(default_factory=set)

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, engine_id: str, entry: KVEntry) -> None:
        """A second request under an id whose entry was not pulled yet replaces it, as the
        fork's `lookup_dict[request_id] = ...` does; both requests stay in `transferring`, and
        once the entry is pulled the fork's `free_transferred_seq_groups` frees the first,
        deletes the entry, and raises KeyError looking it up for the second: the engine's loop
        ends (`on_shared_id`)."""
        if engine_id in self._entries and self.on_shared_id is not None:
            self._shared.add(engine_id)
        self._entries[engine_id] = entry
        self.counters.produced += 1
        for waiter in self._waiters.pop(engine_id, []):
            if not waiter.done():
                waiter.set_result(None)
        if self.entry_ttl_s > 0:
            self.clock.call_later(self.entry_ttl_s, self._expire, engine_id, entry)

    def _expire(self, engine_id: str, entry: KVEntry) -> None:
        if self._entries.get(engine_id) is entry:
            del self._entries[engine_id]
            self.counters.expired += 1
            entry.release()

    async def take(self, engine_id: str, wait: bool = True) -> KVEntry:
        """Wait (without end, like the fork's lookup) for the entry; release it after transfer.
        Without `wait` (V1), a missing entry raises `KVMissing`."""
        while (entry := self._entries.pop(engine_id, None)) is None:
            if not wait:
                raise KVMissing(f"no KV for request {engine_id!r} on this producer")
            waiter = asyncio.get_running_loop().create_future()
            waiters = self._waiters.setdefault(engine_id, [])
            waiters.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:  # the consumer cancelled or went away
                waiters.remove(waiter)
                if not waiters and self._waiters.get(engine_id) is waiters:
                    del self._waiters[engine_id]
                raise
        self.counters.pulled += 1
        self.clock.call_later(self.transfer_seconds(entry.num_tokens), self._sent, engine_id, entry)
        return entry

    def _sent(self, engine_id: str, entry: KVEntry) -> None:
        entry.release()
        if engine_id in self._shared and self.on_shared_id is not None:
            self._shared.discard(engine_id)
            self.on_shared_id(engine_id)


def _line(message: dict[str, Any]) -> bytes:
    return orjson.dumps(message) + b"\n"


class KVChannelServer:
    """Producer side: binds `kv_port`, pairs with one consumer and answers its lookups."""

    def __init__(
        self, store: KVEntryStore, nc_offset: int | None, any_consumer: bool = False
    ) -> None:
        self._store = store
        self._nc_offset = nc_offset
        self._any_consumer = any_consumer
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.StreamWriter] = set()
        self.peer: str | None = None
        self.paired = asyncio.Event()

    async def start(self, host: str, port: int) -> None:
        self._server = await asyncio.start_server(self._handle, host, port)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for writer in self._connections:  # wait_closed waits for every open connection
                writer.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        host, port = writer.get_extra_info("peername")[:2]
        address = f"{host}:{port}"
        lookups: dict[int, asyncio.Task[None]] = {}
        self._connections.add(writer)
        try:
            hello = orjson.loads(await reader.readline() or b"{}")
            if hello.get("hello") != "client":
                return  # a port probe (e.g. `di-router doctor`), not a consumer
            if self.peer is not None and not self._any_consumer:
                reason = f"this producer is already paired with the consumer at {self.peer}"
                log.warning("KV handshake: refused the consumer at %s: %s", address, reason)
                writer.write(_line({"refused": reason}))
                await writer.drain()
                return
            self.peer = address
            writer.write(_line({"hello": "server", "nc_offset": self._nc_offset}))
            log.info(
                "KV handshake: paired with the consumer at %s (its nc offset %s)",
                address,
                hello.get("nc_offset"),
            )
            self.paired.set()
            while line := await reader.readline():
                message = orjson.loads(line)
                tag = int(message["tag"])
                if "lookup" in message:
                    lookups[tag] = asyncio.create_task(
                        self._answer(
                            writer, str(message["lookup"]), tag, lookups, message.get("wait", True)
                        )
                    )
                elif (task := lookups.pop(tag, None)) is not None:
                    task.cancel()
        except (ConnectionError, ValueError, KeyError, TypeError):
            pass
        finally:
            self._connections.discard(writer)
            for task in lookups.values():
                task.cancel()
            if self.peer == address:
                self.peer = None
                log.warning("KV side channel: the consumer at %s went away", address)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _answer(
        self,
        writer: asyncio.StreamWriter,
        engine_id: str,
        tag: int,
        lookups: dict[int, asyncio.Task[None]],
        wait: bool,
    ) -> None:
        try:
            entry = await self._store.take(engine_id, wait)
        except KVMissing as exc:
            reply: dict[str, Any] = {"tag": tag, "missing": str(exc)}
        else:
            reply = {"tag": tag, "token_id": entry.token_id, "num_tokens": entry.num_tokens}
        lookups.pop(tag, None)
        writer.write(_line(reply))


class KVChannelClient:
    """Consumer side: pairs with the producer at `kv_ip:kv_port`, then looks entries up."""

    def __init__(self, host: str, port: int, nc_offset: int | None) -> None:
        self._address = f"{host}:{port}"
        self._host, self._port = host, port
        self._nc_offset = nc_offset
        self._pending: dict[int, tuple[str, asyncio.Future[tuple[int, int]]]] = {}
        self._waits: dict[int, bool] = {}
        self._tags = itertools.count()
        self._writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task[None] | None = None
        self._logged_reason: str | None = None
        self._logged_at = self._waiting_since = float("-inf")
        self.paired = asyncio.Event()
        self.waiting_reason = "not started"

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="sim-kv-client")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def lookup(self, engine_id: str, wait: bool = True) -> tuple[int, int]:
        """(first token id, KV tokens) of `engine_id`, however long the producer takes; without
        `wait`, `KVMissing` if the producer does not hold it."""
        tag = next(self._tags)
        future: asyncio.Future[tuple[int, int]] = asyncio.get_running_loop().create_future()
        self._pending[tag] = (engine_id, future)
        self._waits[tag] = wait
        self._send({"lookup": engine_id, "tag": tag, "wait": wait})
        try:
            return await future
        finally:
            self._waits.pop(tag, None)
            if self._pending.pop(tag, None) is not None:
                self._send({"cancel": engine_id, "tag": tag})

    def _send(self, message: dict[str, Any]) -> None:
        if self._writer is not None:
            self._writer.write(_line(message))

    def _waiting(self, reason: str, alarming: bool = False) -> None:
        """Say why we are not paired: when the reason changes, then every few seconds. Waiting
        for a producer that is still starting is normal (INFO); a refusal, or waiting for
        longer than the interval, is a WARNING."""
        self.waiting_reason = reason
        now = asyncio.get_running_loop().time()
        if self._logged_reason is None:
            self._waiting_since = now
        if reason != self._logged_reason or now - self._logged_at >= WAIT_LOG_INTERVAL_S:
            alarming = alarming or now - self._waiting_since >= WAIT_LOG_INTERVAL_S
            log.log(
                logging.WARNING if alarming else logging.INFO,
                "KV handshake: waiting to pair with the producer at %s (kv_ip:kv_port): %s",
                self._address,
                reason,
            )
            self._logged_reason, self._logged_at = reason, now

    async def _run(self) -> None:
        while True:
            try:
                async with asyncio.timeout(CONNECT_TIMEOUT_S):
                    reader, writer = await asyncio.open_connection(self._host, self._port)
            except TimeoutError:
                self._waiting(
                    f"no answer within {CONNECT_TIMEOUT_S:g} s (wrong kv_ip, or a firewall drops "
                    "the port)",
                    alarming=True,
                )
                continue
            except OSError as exc:
                self._waiting(f"cannot connect ({exc.strerror or exc})")
                await asyncio.sleep(RETRY_S)
                continue
            try:
                await self._session(reader, writer)
            except (OSError, ValueError, KeyError, TypeError) as exc:
                self._waiting(f"side channel failed ({exc!r})")
            finally:
                self._writer = None
                writer.close()
            await asyncio.sleep(RETRY_S)

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(_line({"hello": "client", "nc_offset": self._nc_offset}))
        reply = orjson.loads(await reader.readline() or b"{}")
        if "refused" in reply:
            self._waiting(f"refused: {reply['refused']}", alarming=True)
            return
        if reply.get("hello") != "server":
            self._waiting("the peer closed the connection during the handshake")
            return
        log.info(
            "KV handshake: paired with the producer at %s (its nc offset %s)",
            self._address,
            reply.get("nc_offset"),
        )
        self._logged_reason = None
        self.paired.set()
        self._writer = writer
        for tag, (engine_id, _) in self._pending.items():  # lookups lost with a previous peer
            self._send({"lookup": engine_id, "tag": tag, "wait": self._waits.get(tag, True)})
        while line := await reader.readline():
            message = orjson.loads(line)
            pending = self._pending.pop(int(message["tag"]), None)
            if pending is None or pending[1].done():
                continue
            if "missing" in message:
                pending[1].set_exception(KVMissing(f"{self._address}: {message['missing']}"))
            else:
                pending[1].set_result((int(message["token_id"]), int(message["num_tokens"])))
        self._waiting("the producer went away; pairing again", alarming=True)


class KVPeers:
    """Consumer side, any-to-any: one side channel per producer, opened on first use."""

    def __init__(self, nc_offset: int | None) -> None:
        self._nc_offset = nc_offset
        self._clients: dict[tuple[str, int], KVChannelClient] = {}

    def get(self, host: str, port: int) -> KVChannelClient:
        client = self._clients.get((host, port))
        if client is None:
            client = self._clients[host, port] = KVChannelClient(host, port, self._nc_offset)
            client.start()
        return client

    def __len__(self) -> int:
        return len(self._clients)

    async def close(self) -> None:
        await asyncio.gather(*(client.close() for client in self._clients.values()))
