"""Who may use the router, and what it says to the backends on a client's behalf.

A key the router holds for the backends is sent only for clients the router authenticated
itself; otherwise the router would be an open relay to the accelerators behind it.
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Mapping, Sequence

_TRACEPARENT = re.compile(r"[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}(-[0-9a-f\-]+)?")
_TRACESTATE = re.compile(r"[\x20-\x7e]{1,512}")
_MAX_TRACEPARENT = 256


class AccessControl:
    def __init__(self, api_keys: Sequence[str], backend_key: str | None) -> None:
        self._keys = [key.encode() for key in api_keys if key]
        self._backend_authorization = f"Bearer {backend_key}" if backend_key else None

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    @property
    def backend_authorization(self) -> str | None:
        """For the router's own calls (health checks, model lists)."""
        return self._backend_authorization

    def allows(self, authorization: str | None) -> bool:
        """Constant-time check of `Bearer <key>` against every configured key."""
        if not self._keys:
            return True
        scheme, _, token = (authorization or "").partition(" ")
        presented = token.strip().encode() if scheme.lower() == "bearer" else b""
        matched = False
        for key in self._keys:
            matched |= hmac.compare_digest(presented, key)
        return matched

    def upstream_authorization(self, client_headers: Mapping[str, str]) -> str | None:
        """The router's backend key for a client it authenticated; else the client's own."""
        if self._keys and self._backend_authorization:
            return self._backend_authorization
        return client_headers.get("authorization")


def trace_headers(client_headers: Mapping[str, str]) -> dict[str, str]:
    """W3C trace context, forwarded only when well-formed (it lands in backend logs)."""
    out: dict[str, str] = {}
    parent = client_headers.get("traceparent")
    if parent and len(parent) <= _MAX_TRACEPARENT and _TRACEPARENT.fullmatch(parent):
        out["traceparent"] = parent
        state = client_headers.get("tracestate")
        if state and _TRACESTATE.fullmatch(state):
            out["tracestate"] = state
    return out
