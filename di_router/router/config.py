"""Router settings: one validated model, filled from flags, `DI_ROUTER_*` variables and defaults."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class RouterConfig(BaseModel):
    prefill_urls: list[str] = Field(default=["http://localhost:8100"], min_length=1)
    decode_urls: list[str] = Field(default=["http://localhost:8200"], min_length=1)
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    workers: int = Field(default=1, ge=1)

    connect_timeout_s: float = Field(default=5.0, gt=0)
    """Bound on opening a connection to a backend: a dead backend answers 502 within it."""
    prefill_timeout_s: float = Field(default=300.0, gt=0)
    """Bound on the prefill leg, from dispatch to its first token."""
    decode_timeout_s: float = Field(default=600.0, gt=0)
    """Longest silence allowed on the decode leg (whole response when not streaming)."""
    max_connections: int = Field(default=4096, ge=1)
    """Per backend; size it above the highest in-flight count you expect."""
    keepalive_expiry_s: float = Field(default=4.0, ge=0)
    """Below uvicorn's 5 s idle timeout, so pooled sockets are never stale."""
    max_body_bytes: int = Field(default=64 * 1024 * 1024, ge=1)

    health_interval_s: float = Field(default=5.0, gt=0)
    health_timeout_s: float = Field(default=2.0, gt=0)

    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["text", "json"] = "text"
