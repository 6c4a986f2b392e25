"""One simulated vLLM server's state: its engine, metrics and, in DI, its KV side channel."""

from __future__ import annotations

import asyncio
import functools
import logging
import os
from typing import Any, NoReturn

from di_router.kv_config import KVTransferConfig
from di_router.sim.clock import Clock
from di_router.sim.engine import Engine, Role
from di_router.sim.kv_channel import KVChannelClient, KVChannelServer, KVEntryStore, KVPeers
from di_router.sim.metrics import SimMetrics
from di_router.sim.remote_kv import RemoteKV, etcd_kv_port, nixl_abort_timeout, nixl_side_channel
from di_router.sim.settings import SimSettings

log = logging.getLogger("di_router.sim")

ENGINE_DEAD_EXIT_CODE = 3
"""Exit status when the simulated engine loop died as the fork's would (not an injected crash)."""


class SimServer:
    """State of one simulated vLLM server; owns the engine and the KV side channel."""

    def __init__(self, settings: SimSettings, clock: Clock | None = None) -> None:
        self.settings = settings
        self.clock = clock or Clock()
        self.metrics = SimMetrics(settings.model_name, settings.max_model_len)
        self.kv_store: KVEntryStore | None = None
        self.kv_server: KVChannelServer | None = None
        self.kv_client: KVChannelClient | None = None
        self.remote_kv: RemoteKV | None = None
        self.engine: Engine | None = None

    async def start(self) -> None:
        """Pair over the KV side channel first, as vLLM's `init_device` does before HTTP binds.

        The caller runs this before binding HTTP, so an unpaired server refuses connections
        (what the real one does) rather than answering `/health` with an error.
        """
        s = self.settings
        kv = s.kv_config
        lookup = None
        if kv is not None and (kv.is_nixl or (kv.etcd is not None and s.role is not Role.BASELINE)):
            await self._start_any_to_any(kv)
        elif s.role is Role.PREFILL:
            assert kv is not None
            self.kv_store = KVEntryStore(
                self.clock, s.kv_entry_ttl_s, s.profile.kv_transfer_seconds,
                on_shared_id=_engine_dead,
            )  # fmt: skip
            self.kv_server = KVChannelServer(self.kv_store, kv.neuron_core_offset)
            await self.kv_server.start(s.host, kv.kv_port)
            log.info("KV handshake: waiting for a consumer on port %d", kv.kv_port)
            await self._paired(self.kv_server.paired)
        elif s.role is Role.DECODE:
            assert kv is not None
            self.kv_client = KVChannelClient(kv.kv_ip, kv.kv_port, kv.neuron_core_offset)
            self.kv_client.start()
            await self._paired(self.kv_client.paired)
            lookup = self.kv_client.lookup
        self.engine = Engine(
            s.role,
            s.profile,
            s.max_num_seqs,
            self.metrics,
            self.clock,
            self.kv_store,
            lookup,
            s.kv_timeout_s,
            s.abort_transferring,
        )
        self.engine.start()
        self._register_gauges(self.engine)

    async def _start_any_to_any(self, kv: KVTransferConfig) -> None:
        """No pairing at startup (vLLM V1 NIXL, Neuron 2.26 with etcd): a producer's side channel
        serves every consumer; a consumer opens one per producer when a request names it."""
        s = self.settings
        if kv.is_nixl:
            advertised, port = nixl_side_channel()
            ttl = nixl_abort_timeout()
        else:
            advertised, port, ttl = s.host, etcd_kv_port(s.port), s.kv_entry_ttl_s
        if kv.is_nixl or s.role is Role.PREFILL:
            self.kv_store = KVEntryStore(self.clock, ttl, s.profile.kv_transfer_seconds)
            self.kv_server = KVChannelServer(
                self.kv_store, kv.neuron_core_offset, any_consumer=True
            )
            await self.kv_server.start(s.host, port)
            log.info("KV side channel on port %d, open to any consumer", port)
        self.remote_kv = RemoteKV(
            "nixl" if kv.is_nixl else "etcd",
            KVPeers(kv.neuron_core_offset),
            consumer=s.role is Role.DECODE,
            side_channel=(advertised, port),
            engine_id=kv.engine_id,
        )

    async def _paired(self, paired: asyncio.Event) -> None:
        timeout = self.settings.kv_handshake_timeout_s or None
        try:
            async with asyncio.timeout(timeout):
                await paired.wait()
        except TimeoutError:
            kv = self.settings.kv_config
            assert kv is not None
            log.error(
                "TimeoutError: KV handshake with the peer at %s:%s not completed within %g s "
                "(--sim-kv-handshake-timeout); exiting",
                kv.kv_ip,
                kv.kv_port,
                timeout,
            )
            raise SystemExit(1) from None

    async def stop(self) -> None:
        if self.engine is not None:
            await self.engine.stop()
        if self.kv_server is not None:
            await self.kv_server.close()
        if self.kv_client is not None:
            await self.kv_client.close()
        if self.remote_kv is not None:
            await self.remote_kv.peers.close()

    def _register_gauges(self, engine: Engine) -> None:
        m = self.metrics
        m.gauge(
            "vllm:num_requests_running",
            "Number of requests currently running on GPU.",
            lambda: len(engine.running),
        )
        m.gauge(
            "vllm:num_requests_waiting",
            "Number of requests waiting to be processed.",
            lambda: engine.num_waiting,
        )
        m.gauge("vllm:num_requests_swapped", "Number of requests swapped to CPU.", lambda: 0)
        m.gauge(
            "vllm:gpu_cache_usage_perc",
            "GPU KV-cache usage. 1 means 100 percent usage.",
            lambda: engine.slots_in_use / engine.max_num_seqs,
        )
        m.gauge(
            "vllm:cpu_cache_usage_perc", "CPU KV-cache usage. 1 means 100 percent usage.", lambda: 0
        )
        for device in ("cpu", "gpu"):
            m.gauge(
                f"vllm:{device}_prefix_cache_hit_rate",
                f"{device.upper()} prefix cache block hit rate.",
                lambda: -1,  # vLLM's value without prefix caching
            )
        m.gauge(
            "di_sim:num_requests_transferring",
            "Requests in the scheduler's transferring queue (decode: waiting for KV; prefill: "
            "finished, KV not pulled yet). vLLM counts them in no series.",
            lambda: len(engine.transferring),
        )
        m.gauge(
            "di_sim:slots_in_use",
            "Sequence slots held, including KV pinned for a pull.",
            lambda: engine.slots_in_use,
        )
        for name, doc, read in (
            ("requests_aborted", "Requests aborted because the client went away.", "aborted"),
            (
                "aborts_ignored",
                "Aborts that found the request in transferring, which vLLM does not scan.",
                "aborts_ignored",
            ),
            ("kv_pull_timeouts", "Consumer requests failed by --sim-kv-timeout.", "kv_timeouts"),
        ):
            m.counter_from(f"di_sim:{name}", doc, functools.partial(getattr, engine, read))
        store = self.kv_store
        if store is not None:
            for name, doc in (
                ("produced", "KV entries produced by prefill."),
                ("pulled", "KV entries pulled by a consumer."),
                ("expired", "KV entries dropped unpulled after the TTL."),
            ):
                m.counter_from(
                    f"di_sim:kv_entries_{name}",
                    doc,
                    functools.partial(getattr, store.counters, name),
                )
            m.gauge(
                "di_sim:kv_entries_pending", "KV entries waiting to be pulled.", lambda: len(store)
            )

    def stats(self) -> dict[str, Any]:
        engine = self.engine
        assert engine is not None
        stats: dict[str, Any] = {
            "role": str(self.settings.role),
            "max_num_seqs": engine.max_num_seqs,
            "slots_in_use": engine.slots_in_use,
            "waiting": engine.num_waiting,
            "running": len(engine.running),
            "transferring": len(engine.transferring),
            "aborted": engine.aborted,
            "aborts_ignored": engine.aborts_ignored,
            "kv_pull_timeouts": engine.kv_timeouts,
        }
        if self.kv_store is not None:
            c = self.kv_store.counters
            stats["kv"] = {
                "produced": c.produced,
                "pulled": c.pulled,
                "expired": c.expired,
                "pending": len(self.kv_store),
            }
        if self.kv_server is not None:
            stats["kv_peer"] = self.kv_server.peer
        if self.remote_kv is not None:
            stats["kv_producers_pulled_from"] = len(self.remote_kv.peers)
        return stats


def _engine_dead(engine_id: str) -> NoReturn:
    """The fork's engine loop has raised (AsyncEngineDeadError); vLLM's server then shuts down
    (`entrypoints/launcher.py`, `_add_shutdown_handlers`, unless
    VLLM_KEEP_ALIVE_ON_ENGINE_DEATH)."""
    log.error(
        "engine loop died: KeyError(%r) in free_transferred_seq_groups (two requests under one "
        "id were in `transferring` when its KV was pulled)",
        engine_id,
    )
    os._exit(ENGINE_DEAD_EXIT_CODE)
