"""A small asyncio client for etcd v3 over its JSON gateway: just what registering and watching
workers needs (range, put, lease grant/keepalive/revoke, watch).

Why not an etcd library: `etcd3` (python-etcd3) talks gRPC through generated protobuf modules
that no longer import with protobuf >= 4 (kragniz/python-etcd3 issues #2000 and #2709; the fixes
have stayed unmerged pull requests for years); `etcd3gw` uses the same gateway but is synchronous
(requests) and runs watches in a thread pool; the grpc.aio clients pull in grpcio and protobuf.
Every etcd server since 3.4 serves this gateway under `/v3/` on its client port (HTTP/1.1, JSON,
keys and values base64, 64-bit integers as strings), and httpx is already a dependency.
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any

import httpx

from di_router.discovery.layout import endpoint_url

GRPC_NOT_FOUND = 5


class EtcdError(Exception):
    """etcd was unreachable, answered with an error, or answered something unexpected."""

    def __init__(self, message: str, grpc_code: int | None = None) -> None:
        super().__init__(message)
        self.grpc_code = grpc_code


@dataclass(frozen=True, slots=True)
class WatchEvent:
    """One committed change of a key: a put (`deleted` False) or a delete (lease expiry too)."""

    deleted: bool
    key: str
    value: str


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode("ascii")


def _text(data: object) -> str:
    if not isinstance(data, str):
        return ""
    return base64.b64decode(data).decode(errors="replace")


def _prefix_end(prefix: str) -> str:
    """etcd's `range_end` for "every key starting with `prefix`": the prefix, last byte + 1."""
    raw = prefix.encode()
    return base64.b64encode(raw[:-1] + bytes([raw[-1] + 1])).decode("ascii")


class EtcdClient:
    """One etcd endpoint; every unary call is bounded by `timeout_s`, failures are `EtcdError`."""

    def __init__(self, endpoint: str, *, timeout_s: float = 5.0) -> None:
        self.url = endpoint_url(endpoint)
        self._timeout_s = timeout_s
        # trust_env off: etcd is infrastructure on the cluster network, never behind a web proxy.
        self._http = httpx.AsyncClient(base_url=self.url, timeout=timeout_s, trust_env=False)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def range_prefix(self, prefix: str) -> tuple[int, dict[str, str]]:
        """Every key under `prefix` with its value, and the store revision they were read at."""
        payload = await self._call(
            "/v3/kv/range", {"key": _b64(prefix), "range_end": _prefix_end(prefix)}
        )
        try:
            kvs = {_text(kv["key"]): _text(kv.get("value")) for kv in payload.get("kvs", [])}
            return int(payload["header"]["revision"]), kvs
        except (KeyError, TypeError, ValueError) as exc:
            raise EtcdError(f"etcd range: unexpected answer {payload!r:.200}") from exc

    async def put(self, key: str, value: str, lease: int = 0) -> None:
        await self._call(
            "/v3/kv/put", {"key": _b64(key), "value": _b64(value), "lease": str(lease)}
        )

    async def grant(self, ttl_s: int) -> tuple[int, int]:
        """A new lease: its id and the TTL etcd granted (it raises TTLs below its minimum)."""
        payload = await self._call("/v3/lease/grant", {"TTL": str(ttl_s)})
        try:
            return int(payload["ID"]), int(payload["TTL"])
        except (KeyError, TypeError, ValueError) as exc:
            raise EtcdError(f"etcd lease grant: unexpected answer {payload!r:.200}") from exc

    async def keepalive(self, lease: int) -> int:
        """Refresh a lease; its remaining TTL, 0 when etcd no longer has it (expired, revoked, or
        etcd came back without its data)."""
        payload = await self._call("/v3/lease/keepalive", {"ID": str(lease)})
        result = payload.get("result")
        if not isinstance(result, dict):
            raise EtcdError(f"etcd lease keepalive: unexpected answer {payload!r:.200}")
        try:
            return int(result.get("TTL", 0))
        except (TypeError, ValueError) as exc:
            raise EtcdError(f"etcd lease keepalive: unexpected answer {payload!r:.200}") from exc

    async def revoke(self, lease: int) -> None:
        """Drop a lease and every key attached to it; a lease etcd no longer has is no error."""
        try:
            await self._call("/v3/lease/revoke", {"ID": str(lease)})
        except EtcdError as exc:
            if exc.grpc_code != GRPC_NOT_FOUND:
                raise

    async def watch_prefix(
        self, prefix: str, start_revision: int, idle_timeout_s: float
    ) -> AsyncGenerator[list[WatchEvent], None]:
        """Batches of changes under `prefix` from `start_revision` on, as etcd commits them.

        Ends quietly when nothing arrived for `idle_timeout_s`: the caller then re-syncs, which
        also bounds how long a silently dead connection (a host gone, no RST) goes unnoticed.
        Raises `EtcdError` when the stream breaks or ends, or etcd cancels the watch (its start
        revision was compacted). Close it with `contextlib.aclosing`.
        """
        body = {
            "create_request": {
                "key": _b64(prefix),
                "range_end": _prefix_end(prefix),
                "start_revision": str(start_revision),
            }
        }
        timeout = httpx.Timeout(self._timeout_s, read=idle_timeout_s)
        try:
            async with self._http.stream("POST", "/v3/watch", json=body, timeout=timeout) as resp:
                if resp.status_code != 200:
                    await resp.aread()
                    raise EtcdError(f"etcd watch: HTTP {resp.status_code}: {resp.text[:200]}")
                async for line in resp.aiter_lines():
                    if line.strip():
                        events = _watch_events(line)
                        if events:
                            yield events
        except httpx.ReadTimeout:
            return
        except httpx.HTTPError as exc:
            raise EtcdError(f"etcd watch at {self.url}: {exc!r}") from exc
        raise EtcdError(f"etcd watch at {self.url}: the stream ended")

    async def _call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        try:
            response = await self._http.post(path, json=body)
        except httpx.HTTPError as exc:
            raise EtcdError(f"etcd at {self.url}: {exc!r}") from exc
        try:
            payload = response.json()
        except ValueError:
            payload = None
        if not isinstance(payload, dict):
            raise EtcdError(f"etcd {path}: HTTP {response.status_code}: {response.text[:200]}")
        if response.status_code != 200 or "error" in payload:
            raise _error(path, payload, response.status_code)
        return payload


def _error(what: str, payload: dict[str, Any], status: int | None = None) -> EtcdError:
    """The gateway's error body: `{"error", "message", "code"}` for a unary call,
    `{"error": {"grpc_code", "message", ...}}` inside a stream."""
    error = payload.get("error")
    detail = error if isinstance(error, dict) else payload
    code = detail.get("grpc_code", detail.get("code"))
    message = detail.get("message", error)
    prefix = f"etcd {what}" + (f": HTTP {status}" if status not in (None, 200) else "")
    return EtcdError(f"{prefix}: {message}", code if isinstance(code, int) else None)


def _watch_events(line: str) -> list[WatchEvent]:
    try:
        payload = json.loads(line)
        if "error" in payload:
            raise _error("watch", payload)
        result = payload["result"]
        if result.get("canceled"):
            reason = result.get("cancel_reason") or (
                f"revision compacted up to {result.get('compact_revision')}"
            )
            raise EtcdError(f"etcd cancelled the watch: {reason}")
        return [
            WatchEvent(
                deleted=event.get("type") == "DELETE",
                key=_text(event["kv"]["key"]),
                value=_text(event["kv"].get("value")),
            )
            for event in result.get("events", [])
        ]
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise EtcdError(f"etcd watch: unexpected message {line[:200]!r}") from exc
