"""Worker discovery against a real etcd: registration, lease expiry, etcd outages, simulators."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from collections.abc import Callable, Iterator

import pytest

from di_router.discovery import (
    EtcdClient,
    Worker,
    WorkerRegistration,
    WorkerSets,
    WorkerWatcher,
    parse_worker_key,
    worker_key,
)
from di_router.discovery.layout import endpoint_url
from di_router.kv_config import parse_kv_transfer_config
from di_router.sim.registration import advertised_ip
from tests.discovery.conftest import EtcdServer, needs_etcd
from tests.support import Proc, free_port, kv_config, start_sim

pytestmark = pytest.mark.anyio

A = Worker("10.0.0.1", 8100)
B = Worker("10.0.0.2", 8200)
C = Worker("10.0.0.3", 8200)
NONE: frozenset[Worker] = frozenset()


async def eventually(predicate: Callable[[], object], timeout: float, what: str) -> float:
    """Bounded poll that keeps the event loop (and the code under test) running; seconds taken."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    while not predicate():
        if loop.time() - start > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)
    return loop.time() - start


class Follower:
    """A watcher plus every set it published through its callback."""

    def __init__(self, client: EtcdClient, **options: float) -> None:
        self.published: list[WorkerSets] = []
        self.watcher = WorkerWatcher(client, self.published.append, **options)

    def has(self, prefill: frozenset[Worker], decode: frozenset[Worker]) -> bool:
        return dict(self.watcher.workers) == {"prefill": prefill, "decode": decode}


class LoopLag:
    """The longest the event loop went without running a 10 ms timer: a blocking call shows."""

    def __init__(self) -> None:
        self.worst = 0.0
        self._task = asyncio.create_task(self._tick())

    async def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            before = loop.time()
            await asyncio.sleep(0.01)
            self.worst = max(self.worst, loop.time() - before - 0.01)

    def stop(self) -> float:
        self._task.cancel()
        return self.worst


# --- the registry layout and the KV config (no server needed) --------------------------------


def test_worker_keys_round_trip_and_foreign_keys_are_ignored() -> None:
    assert worker_key("decode", B) == "/workers/decode/10.0.0.2/8200"
    assert parse_worker_key(worker_key("prefill", A)) == ("prefill", A)
    assert parse_worker_key("/workers/decode/::1/8200") == ("decode", Worker("::1", 8200))
    for key in (
        "/workers/router/10.0.0.1/8000",
        "/workers/decode/10.0.0.1",
        "/workers/decode/10.0.0.1/http",
        "/workers/decode/10.0.0.1/70000",
        "/workers/decode//8200",
        "/workers/decode/10.0.0.1/8200/extra",
        "/other/decode/10.0.0.1/8200",
    ):
        assert parse_worker_key(key) is None, key


def test_etcd_endpoints() -> None:
    assert endpoint_url("10.0.0.5:8989") == "http://10.0.0.5:8989"
    assert endpoint_url("https://etcd.internal:2379/") == "https://etcd.internal:2379"
    assert endpoint_url("[::1]:2379") == "http://[::1]:2379"
    for bad in ("10.0.0.5", "10.0.0.5:port", "ftp://h:1", "h:1/v3", "h:99999"):
        with pytest.raises(ValueError, match="etcd endpoint"):
            endpoint_url(bad)


def test_kv_config_takes_the_tutorials_etcd_field() -> None:
    # The 2.26 tutorial's worker config: role and etcd, no kv_parallel_size, kv_ip or kv_port.
    text = '{"kv_connector":"NeuronConnector","kv_role":"kv_consumer","kv_buffer_size":2e11,'
    assert parse_kv_transfer_config(text + '"etcd":"10.0.0.5:8989"}').etcd == "10.0.0.5:8989"
    with pytest.raises(ValueError, match="kv_parallel_size"):  # static pairing still needs 2
        parse_kv_transfer_config(text[:-1] + "}")
    with pytest.raises(ValueError, match=r"etcd: .*not HOST:PORT"):
        parse_kv_transfer_config(text + '"etcd":"10.0.0.5"}')


def test_advertised_address() -> None:
    assert advertised_ip("10.1.2.3", "http://127.0.0.1:2379") == "10.1.2.3"
    # Listening on every interface: the address of the route to etcd.
    assert advertised_ip("0.0.0.0", "http://127.0.0.1:2379") == "127.0.0.1"


async def test_without_etcd_nothing_fails_or_blocks() -> None:
    client = EtcdClient(f"127.0.0.1:{free_port()}", timeout_s=1.0)
    follower = Follower(client, max_backoff_s=0.2)
    registration = WorkerRegistration(client, "prefill", A)
    lag = LoopLag()
    follower.watcher.start()
    registration.start()
    assert not await follower.watcher.wait_synced(0.5)
    assert follower.has(NONE, NONE) and not registration.registered
    await registration.stop()
    await follower.watcher.stop()
    await client.aclose()
    assert lag.stop() < 0.2


# --- against a real etcd ----------------------------------------------------------------------


@needs_etcd
async def test_registration_appears_and_stop_removes_it(etcd: EtcdServer) -> None:
    client = EtcdClient(etcd.endpoint)
    follower = Follower(client)
    follower.watcher.start()
    assert await follower.watcher.wait_synced(5)
    registration = WorkerRegistration(client, "prefill", A, value='{"model": "m"}')
    registration.start()
    await eventually(lambda: follower.has(frozenset({A}), NONE), 5, "the worker to appear")
    assert registration.registered
    _, kvs = await client.range_prefix("/workers/")
    assert kvs == {"/workers/prefill/10.0.0.1/8100": '{"model": "m"}'}

    await registration.stop()  # revoked: gone at once, not after the 60 s TTL
    assert await eventually(lambda: follower.has(NONE, NONE), 5, "the worker to leave") < 5
    assert [dict(s) for s in follower.published] == [
        {"prefill": frozenset({A}), "decode": NONE},
        {"prefill": NONE, "decode": NONE},
    ]
    await follower.watcher.stop()
    await client.aclose()


REGISTRAR = """
import asyncio, sys
from di_router.discovery import EtcdClient, Worker, WorkerRegistration

async def main() -> None:
    client = EtcdClient(sys.argv[1])
    registration = WorkerRegistration(client, "decode", Worker("10.0.0.2", 8200), ttl_s=2)
    registration.start()
    await asyncio.Event().wait()

asyncio.run(main())
"""


@needs_etcd
async def test_a_killed_worker_leaves_when_its_lease_expires(etcd: EtcdServer) -> None:
    client = EtcdClient(etcd.endpoint)
    follower = Follower(client)
    follower.watcher.start()
    registrar = Proc("registrar", [sys.executable, "-c", REGISTRAR, etcd.endpoint], "")
    try:
        await eventually(lambda: follower.has(NONE, frozenset({B})), 10, "the worker to register")
        # Two TTLs pass: only its keepalives hold the key.
        await asyncio.sleep(4.5)
        assert len(follower.published) == 1 and follower.has(NONE, frozenset({B}))
        await asyncio.to_thread(registrar.stop, signal.SIGKILL)
        took = await eventually(lambda: follower.has(NONE, NONE), 6, "the lease to expire")
        assert took > 1.0, "gone at once: revoked, not expired"
    finally:
        registrar.stop(signal.SIGKILL)
        await follower.watcher.stop()
        await client.aclose()


@needs_etcd
async def test_watcher_keeps_the_last_set_while_etcd_is_down_then_resyncs(
    etcd: EtcdServer,
) -> None:
    client = EtcdClient(etcd.endpoint, timeout_s=1.0)
    follower = Follower(client, max_backoff_s=0.3)
    a = WorkerRegistration(client, "prefill", A, ttl_s=2)
    c = WorkerRegistration(client, "decode", C, ttl_s=2)
    lag = LoopLag()
    for task in (follower.watcher, a, c):
        task.start()
    await eventually(lambda: follower.has(frozenset({A}), frozenset({C})), 5, "both workers")

    await asyncio.to_thread(etcd.proc.stop, signal.SIGKILL)
    await eventually(lambda: not follower.watcher.synced, 5, "the watcher to lose etcd")
    await c.stop()  # cannot revoke while etcd is down
    await asyncio.sleep(0.5)  # reconnect attempts fail meanwhile
    assert follower.has(frozenset({A}), frozenset({C})), "the last known set is kept"

    # etcd comes back without its data: C's key is gone, A's lease is unknown to it.
    await asyncio.to_thread(etcd.restart, fresh=True)
    await eventually(
        lambda: follower.watcher.synced and follower.has(frozenset({A}), NONE),
        10,
        "a re-sync that drops C and A registering again",
    )
    assert a.registered
    assert lag.stop() < 0.25
    await a.stop()
    await follower.watcher.stop()
    await client.aclose()


@pytest.fixture
def etcd_sims(etcd: EtcdServer) -> Iterator[dict[str, Proc]]:
    """A prefill and a decode simulator (one static pair) whose KV configs name etcd."""
    kv_port = free_port()
    sims = {}
    try:
        for role, kv_role in (("prefill", "kv_producer"), ("decode", "kv_consumer")):
            config = json.loads(kv_config(kv_role, kv_port)) | {"etcd": etcd.endpoint}
            extra = ["--kv-transfer-config", json.dumps(config)]
            sims[role] = start_sim("baseline", extra=extra, name=role)
        for sim in sims.values():
            sim.wait_ready()
        yield sims
    finally:
        for sim in sims.values():
            sim.stop()


@needs_etcd
async def test_simulators_register_in_the_roles_of_their_kv_config(
    etcd: EtcdServer, etcd_sims: dict[str, Proc]
) -> None:
    client = EtcdClient(etcd.endpoint)
    follower = Follower(client)
    follower.watcher.start()
    prefill, decode = (
        Worker("127.0.0.1", int(etcd_sims[role].url.rsplit(":", 1)[1]))
        for role in ("prefill", "decode")
    )
    await eventually(
        lambda: follower.has(frozenset({prefill}), frozenset({decode})), 10, "both simulators"
    )
    for sim in etcd_sims.values():  # SIGTERM: they revoke their leases (TTL 60 s) on the way out
        assert await asyncio.to_thread(sim.stop) == 0
    await eventually(lambda: follower.has(NONE, NONE), 5, "both simulators to unregister")
    await follower.watcher.stop()
    await client.aclose()
