"""Router settings: one validated model, filled from flags, `DI_ROUTER_*` variables and defaults."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, model_validator


class RouterConfig(BaseModel):
    prefill_urls: list[str] = Field(default=["http://localhost:8100"])
    decode_urls: list[str] = Field(default=["http://localhost:8200"])
    etcd: str | None = None
    """HOST:PORT of an etcd whose `/workers/` registry (Neuron 2.26) lists the backends; the
    servers given by URL (if any) are kept too."""
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    workers: int = Field(default=1, ge=1)
    kv_protocol: Literal["neuron", "nixl"] = "neuron"
    """neuron: Neuron's vLLM fork (both legs at once, decode repeats the first token);
    nixl: vLLM V1 with NixlConnector (prefill first, `kv_transfer_params` to decode)."""
    pairing: Literal["static", "any"] | None = None
    """static: the i-th prefill serves with the i-th decode (Neuron 2.24); any: each role is
    picked on its own (vLLM V1 NIXL, Neuron 2.26 discovery). Default: the protocol's."""
    selection: Literal["least_outstanding", "round_robin"] = "least_outstanding"

    connect_timeout_s: float = Field(default=5.0, gt=0)
    """Bound on opening a connection to a backend: a dead backend answers 502 within it."""
    prefill_timeout_s: float = Field(default=300.0, gt=0)
    """Bound on the prefill leg, from dispatch to its first token."""
    decode_timeout_s: float = Field(default=600.0, gt=0)
    """Longest silence on a decode stream; the whole wait for a non-streamed answer."""
    body_timeout_s: float = Field(default=30.0, gt=0)
    """Bound on reading a client's request body (a slow client holds a descriptor)."""
    drain_timeout_s: float = Field(default=30.0, ge=0)
    """On SIGTERM/SIGINT, how long in-flight requests may finish before they are ended."""
    settle_timeout_s: float = Field(default=600.0, gt=0)
    """Bound on the background work that frees the slots of a request that ended badly
    (re-sending its prefill, pulling a stranded KV entry, waiting for an unabortable decode)."""

    max_connections: int = Field(default=4096, ge=1)
    """Upstream connections per backend; size it above the highest in-flight count you expect."""
    keepalive_expiry_s: float = Field(default=4.0, ge=0)
    """Below uvicorn's 5 s idle timeout, so pooled sockets are never stale."""
    max_body_bytes: int = Field(default=64 * 1024 * 1024, ge=1)
    max_event_bytes: int = Field(default=16 * 1024 * 1024, ge=1024)
    """Largest single SSE event accepted from a backend (an echoed prompt can be large)."""
    max_response_bytes: int = Field(default=128 * 1024 * 1024, ge=1024)
    """Largest non-streamed answer accepted from a backend."""
    max_concurrent_requests: int = Field(default=0, ge=0)
    """Completions served at once (0: no limit); beyond it requests queue."""
    max_queued_requests: int = Field(default=1024, ge=0)
    """Requests waiting for a place; beyond it the answer is an immediate 429."""
    queue_timeout_s: float = Field(default=30.0, gt=0)

    api_keys: list[str] = Field(default_factory=list)
    """Keys clients must present as `Authorization: Bearer <key>` on /v1 routes (none: open)."""
    backend_api_key: str | None = None
    """Key the router sends to the backends for clients it authenticated itself."""
    protect_metrics: bool = False
    """Require a client key on /metrics too (health and readiness stay open)."""
    verbose_errors: bool = False
    """Put backend URLs and exception details in client-facing messages (development only)."""

    ssl_certfile: str | None = None
    """With `ssl_keyfile`: the router's own listener speaks HTTPS."""
    ssl_keyfile: str | None = None
    ssl_ca_file: str | None = None
    """CA bundle that `https://` backends' certificates are checked against (default: the
    system's)."""

    health_interval_s: float = Field(default=5.0, gt=0)
    health_timeout_s: float = Field(default=2.0, gt=0)

    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["text", "json"] = "text"

    @model_validator(mode="after")
    def _pairs(self) -> RouterConfig:
        if self.etcd is None and not (self.prefill_urls and self.decode_urls):
            raise ValueError("a prefill and a decode server are needed (or --etcd)")
        if self.effective_pairing == "static" and len(self.prefill_urls) != len(self.decode_urls):
            raise ValueError(
                f"static pairing needs as many prefill as decode servers (the i-th serves with "
                f"the i-th); got {len(self.prefill_urls)} and {len(self.decode_urls)}"
            )
        if (self.ssl_certfile is None) != (self.ssl_keyfile is None):
            raise ValueError("--ssl-certfile and --ssl-keyfile go together")
        return self

    @property
    def effective_pairing(self) -> str:
        if self.pairing is not None:
            return self.pairing
        return "any" if self.kv_protocol == "nixl" or self.etcd else "static"
