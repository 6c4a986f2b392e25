"""The router's ASGI application.

The two completion routes go straight to the request lifecycle (plain ASGI: they are the hot
path and need nothing of a framework); everything else (health, readiness, metrics, models,
version, errors for unknown routes) is a small Quart app. Access control sits in front of both.
"""

from __future__ import annotations

import os

import httpx
import orjson
from quart import Quart, Response, request
from werkzeug.exceptions import HTTPException

from di_router import __version__
from di_router.router.client import Receive, Scope, Send
from di_router.router.config import RouterConfig
from di_router.router.service import RouterService
from di_router.router.upstream import normalise_error_body
from di_router.wire.errors import error_body
from di_router.wire.responses import json_response

CONFIG_ENV = "_DI_ROUTER_WORKER_CONFIG"
"""The resolved config, handed to Hypercorn's worker processes (not a setting: no DI_ROUTER_)."""
_COMPLETION_ROUTES = {"/v1/completions": False, "/v1/chat/completions": True}
_UNAUTHORIZED = orjson.dumps(error_body(401, "Missing or invalid API key."))
_NOT_ALLOWED = orjson.dumps(error_body(405, "Only POST is allowed on this route."))


class RouterApp:
    """ASGI entry point; `service` holds the state and `ops` the framework routes."""

    def __init__(self, config: RouterConfig) -> None:
        self.config = config
        self.service = RouterService(config)
        self.ops = _ops_app(self.service)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path = scope["path"]
            if self._needs_key(path) and not self._authorized(scope):
                await _send_json(send, 401, _UNAUTHORIZED, [(b"www-authenticate", b"Bearer")])
                return
            chat = _COMPLETION_ROUTES.get(path)
            if chat is not None:
                if scope["method"] == "POST":
                    await self.service.serve_completion(scope, receive, send, chat)
                else:
                    await _send_json(send, 405, _NOT_ALLOWED, [(b"allow", b"POST")])
                return
        await self.ops(scope, receive, send)  # type: ignore[arg-type]

    def _needs_key(self, path: str) -> bool:
        access = self.service.access
        return access.enabled and (
            path.startswith("/v1/") or (path == "/metrics" and self.config.protect_metrics)
        )

    def _authorized(self, scope: Scope) -> bool:
        for name, value in scope["headers"]:
            if name == b"authorization":
                return self.service.access.allows(value.decode("latin-1"))
        return False

    def begin_drain(self) -> None:
        self.service.begin_drain()


async def _send_json(
    send: Send, status: int, body: bytes, extra: list[tuple[bytes, bytes]]
) -> None:
    headers = [(b"content-type", b"application/json"), *extra]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def _ops_app(service: RouterService) -> Quart:
    config = service.config
    app = Quart("di_router.router")
    app.config["MAX_CONTENT_LENGTH"] = 1 << 20  # no route here takes a body

    @app.before_serving
    async def _startup() -> None:
        await service.start()

    @app.after_serving
    async def _shutdown() -> None:
        await service.stop()

    @app.errorhandler(HTTPException)
    async def _http_error(exc: HTTPException) -> Response:
        status = exc.code or 500
        return json_response(error_body(status, exc.description or exc.name), status)

    @app.get("/v1/models")
    async def models() -> Response:
        backend = service.selection.pick()[1]
        headers = {}
        if authorization := service.access.upstream_authorization(
            {k.lower(): v for k, v in request.headers.items()}
        ):
            headers["Authorization"] = authorization
        try:
            upstream = await backend.probe.get(
                "/v1/models", headers=headers, timeout=config.connect_timeout_s
            )
        except httpx.HTTPError:
            return json_response(error_body(502, "decode server did not list its models"), 502)
        if upstream.status_code != 200:  # e.g. vLLM's 401 `{"error": "Unauthorized"}`
            status = upstream.status_code
            return json_response(normalise_error_body(status, upstream.content), status)
        return Response(upstream.content, status=200, content_type="application/json")

    @app.get("/health")
    async def liveness() -> Response:
        return json_response({"status": "ok"})

    @app.get("/ready")
    async def readiness() -> Response:
        ready, report = service.health.readiness()
        if service.draining:
            ready = False
        body = {
            "ready": ready,
            **report,
            "draining": service.draining,
            "orphaned_decodes": service.settler.orphaned,
        }
        return json_response(body, 200 if ready else 503)

    @app.get("/backends")
    async def backends() -> Response:
        """Each backend's state, load and pairing, for operators and scripts."""
        selection = service.selection
        rows = []
        for role, pool in (("prefill", service.prefill), ("decode", service.decode)):
            for i, b in enumerate(pool.backends):
                peer = None
                if selection.pairing == "static":  # by position
                    other = service.decode if role == "prefill" else service.prefill
                    peer = other.backends[i].url
                rows.append(
                    {
                        "role": role,
                        "url": b.url,
                        "state": b.state,
                        "outstanding": b.outstanding,
                        "stranded_kv": b.stranded,
                        "paired_with": peer,
                    }
                )
        return json_response({"pairing": selection.pairing, "backends": rows})

    @app.get("/version")
    async def version() -> Response:
        return json_response({"version": __version__, "protocol": service.protocol.name})

    @app.get("/metrics")
    async def metrics_route() -> Response:
        return Response(service.metrics.exposition(), content_type="text/plain; version=0.0.4")

    return app


def create_app(config: RouterConfig) -> RouterApp:
    return RouterApp(config)


def create_app_from_env() -> RouterApp:
    """Entry point for Hypercorn workers, which get the config through the environment."""
    from di_router.router.logs import configure_logging

    config = RouterConfig.model_validate(orjson.loads(os.environ[CONFIG_ENV]))
    configure_logging(config.log_level, config.log_format)
    return create_app(config)
