"""The router's long-lived state (backends, protocol, policies) and the door every completion
request comes through: shutdown, admission, then its lifecycle (`lifecycle.Completion`)."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Collection

import orjson

from di_router.router.access_control import AccessControl, trace_headers
from di_router.router.admission import Admission, Overloaded
from di_router.router.backends import Backend, Selection, make_pool
from di_router.router.client import Client, Receive, Scope, Send
from di_router.router.config import RouterConfig
from di_router.router.exchange import DIProtocol, LegOpener
from di_router.router.health import HealthMonitor
from di_router.router.lifecycle import SHUTDOWN, Completion
from di_router.router.metrics import UNKNOWN_MODEL, RouterMetrics
from di_router.router.neuron import NeuronFirstToken
from di_router.router.nixl import NixlProtocol
from di_router.router.recorder import Recorder
from di_router.router.registry import Registry
from di_router.router.settle import Settler
from di_router.router.trace import RequestTrace
from di_router.router.upstream import Leg, UpstreamError
from di_router.router.waiting import until_done
from di_router.wire.errors import error_body

log = logging.getLogger("di_router.router")

_SETTLE_ON_STOP_S = 5.0


class RouterService:
    def __init__(self, config: RouterConfig) -> None:
        self.config = config
        self.metrics = RouterMetrics()
        self.prefill = make_pool("prefill", config.prefill_urls, config)
        self.decode = make_pool("decode", config.decode_urls, config)
        self.protocol: DIProtocol = (
            NixlProtocol() if config.kv_protocol == "nixl" else (NeuronFirstToken())
        )
        self.selection = Selection(
            self.prefill, self.decode, config.effective_pairing, config.selection, os.getpid()
        )
        self.access = AccessControl(config.api_keys, config.backend_api_key)
        self.recorder = Recorder(self.metrics, self.model_label, config.log_format == "json")
        self.settler = Settler(self.metrics, config.settle_timeout_s)
        self.admission = Admission(
            config.max_concurrent_requests, config.max_queued_requests, config.queue_timeout_s
        )
        self.health = HealthMonitor(
            [self.prefill, self.decode],
            self.metrics,
            config.health_interval_s,
            self.access.backend_authorization,
        )
        self.registry: Registry | None = None
        if config.etcd:
            pools = {"prefill": self.prefill, "decode": self.decode}
            self.registry = Registry(config.etcd, pools, config, self.health)
        self.draining = False
        self._active: set[asyncio.Task[object]] = set()
        self._drain_task: asyncio.Task[None] | None = None
        self._now = asyncio.Event()
        """Set by a second SIGTERM/SIGINT: end what is left at once."""

    # -- serving ---------------------------------------------------------------------------------
    async def serve_completion(
        self, scope: Scope, receive: Receive, send: Send, chat: bool
    ) -> None:
        client = Client(scope, receive, send)
        if self.draining:
            await self._turn_away(client, 503, "shutdown", "The router is shutting down.")
            return
        try:
            await self.admission.enter()
        except Overloaded:
            await self._turn_away(
                client, 429, "overload", "Too many requests in flight; retry shortly."
            )
            return
        task = asyncio.current_task()
        assert task is not None
        self._active.add(task)
        self.recorder.started()
        try:
            await Completion(self, client, chat).run()
        finally:
            self._active.discard(task)
            self.admission.leave()

    async def _turn_away(self, client: Client, status: int, reason: str, message: str) -> None:
        self.metrics.rejected.labels(reason).inc()
        await client.respond(
            status, orjson.dumps(error_body(status, message)), [(b"retry-after", b"1")]
        )

    def leg_opener(
        self, client: Client, hex_id: str, path: str, stream: bool, pair: tuple[Backend, Backend]
    ) -> LegOpener:
        """Starts one request's legs. A leg's socket may stay silent for its role's bound; a
        non-streamed decode sends nothing before its whole answer, a prefill that missed its
        timeout is read on (not aborted: see `neuron.py`), and a held leg may be kept past the
        client's deadline, so their sockets wait as long as settling may (the client's own
        deadlines are enforced by the exchange).

        With discovery (Neuron 2.26), servers are not paired at startup: each leg's id names
        its peer, `cmpl-<hex>_<peer host>:<peer port>`, so that decode knows whom to pull from.
        """
        config = self.config
        headers = self.upstream_headers(client, hex_id)
        silence = {
            "prefill": config.settle_timeout_s,
            "decode": config.decode_timeout_s if stream else config.settle_timeout_s,
        }
        prefill, decode = pair
        peer = {prefill.role: decode, decode.role: prefill}

        def open_leg(backend: Backend, content: bytes, held: bool = False) -> Leg:
            leg_headers = headers
            if self.registry is not None:
                address = peer[backend.role].url.split("://", 1)[-1]
                leg_headers = {**headers, "X-Request-Id": f"cmpl-{hex_id}_{address}"}
            return Leg(
                backend, path, content, leg_headers,
                config.settle_timeout_s if held else silence[backend.role],
                config.max_event_bytes,
            )  # fmt: skip

        return open_leg

    def has_other(self, tried: Collection[Backend]) -> bool:
        """Whether a pair without any of these backends exists."""
        prefill, decode = self.selection.pick(tried)
        return prefill not in tried and decode not in tried

    def upstream_headers(self, client: Client, hex_id: str) -> dict[str, str]:
        """Only an allow-list goes upstream. The id is the bare hex: vLLM then names the
        request `cmpl-<hex>`, the client's id, and both servers derive one engine id from it."""
        headers = {"Content-Type": "application/json", "X-Request-Id": hex_id}
        authorization = self.access.upstream_authorization(client.headers)
        if authorization:
            headers["Authorization"] = authorization
        headers.update(trace_headers(client.headers))
        return headers

    def log_upstream_error(self, error: UpstreamError, trace: RequestTrace) -> None:
        log.warning(
            "%s %s: %s (%s)", trace.router_id, error.role, error.message, error.detail or "-"
        )

    def client_error_body(self, error: UpstreamError) -> dict[str, object]:
        if not self.config.verbose_errors or not error.detail:
            return error.body
        return error_body(error.status, f"{error.message} [{error.detail}]")

    def model_label(self, model: str | None) -> str:
        """The request's model if a decode server serves it: labels stay bounded."""
        known = {name for b in self.decode.backends for name in b.model_names}
        return model if model in known else UNKNOWN_MODEL

    # -- life ------------------------------------------------------------------------------------
    async def start(self) -> None:
        if self.selection.pairing == "static":
            for p, d in zip(self.prefill.backends, self.decode.backends, strict=True):
                self.metrics.backend_pair.labels("prefill", p.url, d.url).set(1)
                self.metrics.backend_pair.labels("decode", d.url, p.url).set(1)
        if self.registry is not None:
            await self.registry.start()
        await self.health.poll_once()
        self.health.start()

    def begin_drain(self) -> None:
        """SIGTERM/SIGINT: not ready any more; requests in flight get the drain timeout. A
        second signal (Ctrl-C again) ends the requests and the settlements left at once."""
        if self._drain_task is None:
            self.draining = True
            self._drain_task = asyncio.ensure_future(self._drain())
        elif not self._now.is_set():
            log.warning(
                "second signal: ending %d requests and %d settlements now (on Neuron a decode "
                "slot may stay held)", len(self._active), self.settler.running,
            )  # fmt: skip
            self._now.set()

    async def _drain(self) -> None:
        active = set(self._active)
        if active:
            log.info("draining %d requests (up to %gs)", len(active), self.config.drain_timeout_s)
            await until_done(active, self.config.drain_timeout_s, self._now)
        for task in self._active:
            task.cancel(SHUTDOWN)

    async def stop(self) -> None:
        if self._drain_task is not None:
            await self._drain_task
        if self.registry is not None:
            await self.registry.stop()
        await self.health.stop()
        await self.settler.wait(_SETTLE_ON_STOP_S, self._now)
        await self.prefill.aclose()
        await self.decode.aclose()
