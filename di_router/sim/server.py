"""One simulated vLLM server's state: its engine, metrics and, for a producer, the KV port."""

from __future__ import annotations

from typing import Any

from di_router.sim.engine import Engine, Role
from di_router.sim.kv_channel import KVChannelServer, KVEntryStore, pull_entry
from di_router.sim.metrics import SimMetrics
from di_router.sim.settings import SimSettings


class SimServer:
    """State of one simulated vLLM server; owns the engine and, for a producer, the KV port."""

    def __init__(self, settings: SimSettings) -> None:
        self.settings = settings
        self.metrics = SimMetrics(settings.model_name)
        self.kv_store: KVEntryStore | None = None
        self.kv_server: KVChannelServer | None = None
        self.engine: Engine | None = None

    async def start(self) -> None:
        s = self.settings
        pull = None
        if s.role is Role.PREFILL:
            self.kv_store = KVEntryStore(s.kv_entry_ttl_s, s.profile.kv_transfer_seconds)
            self.kv_server = KVChannelServer(self.kv_store)
            assert s.kv_config is not None
            await self.kv_server.start(s.host, s.kv_config.kv_port)
        elif s.role is Role.DECODE:
            kv = s.kv_config
            assert kv is not None

            async def pull(engine_id: str, timeout: float) -> tuple[int, int]:
                return await pull_entry(kv.kv_ip, kv.kv_port, engine_id, timeout)

        self.engine = Engine(
            s.role, s.profile, s.max_num_seqs, self.metrics, self.kv_store, pull, s.kv_timeout_s
        )
        self.engine.start()
        self._register_gauges(self.engine)

    async def stop(self) -> None:
        if self.engine is not None:
            await self.engine.stop()
        if self.kv_server is not None:
            await self.kv_server.close()

    def _register_gauges(self, engine: Engine) -> None:
        m = self.metrics
        m.gauge(
            "vllm:num_requests_running", "Number of requests running.", lambda: engine.num_running
        )
        m.gauge(
            "vllm:num_requests_waiting", "Number of requests waiting.", lambda: engine.num_waiting
        )
        m.gauge("vllm:num_requests_swapped", "Number of requests swapped to CPU.", lambda: 0)
        m.gauge(
            "vllm:gpu_cache_usage_perc",
            "KV-cache usage. 1 means 100 percent usage.",
            lambda: engine.slots_in_use / engine.max_num_seqs,
        )
        m.gauge(
            "di_sim:slots_in_use",
            "Sequence slots held, including KV pinned for a pull.",
            lambda: engine.slots_in_use,
        )
        m.counter_from(
            "di_sim:requests_aborted",
            "Requests aborted because the client went away.",
            lambda: engine.aborted,
        )
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
                    lambda name=name: getattr(store.counters, name),
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
            "kv_pull_timeouts": int(self.metrics.kv_pull_timeouts._value.get()),
        }
        if self.kv_store is not None:
            c = self.kv_store.counters
            stats["kv"] = {
                "produced": c.produced,
                "pulled": c.pulled,
                "expired": c.expired,
                "pending": len(self.kv_store),
            }
        return stats
