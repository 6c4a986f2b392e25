"""The router's Quart application: routes, lifespan and OpenAI-format errors for everything."""

from __future__ import annotations

import os

import httpx
import orjson
from quart import Quart, Response, request
from werkzeug.exceptions import HTTPException

from di_router import __version__
from di_router.router.backends import make_pool
from di_router.router.config import RouterConfig
from di_router.router.health import HealthMonitor
from di_router.router.metrics import RouterMetrics
from di_router.router.proxy import Proxy
from di_router.router.strategy import NeuronFirstToken
from di_router.router.upstream import normalise_error_body
from di_router.wire.errors import error_body
from di_router.wire.responses import json_response

CONFIG_ENV = "DI_ROUTER_CONFIG_JSON"


def create_app(config: RouterConfig) -> Quart:
    app = Quart("di_router.router")
    app.config["RESPONSE_TIMEOUT"] = None  # streams may run for hours; legs have own bounds
    app.config["BODY_TIMEOUT"] = config.decode_timeout_s
    app.config["MAX_CONTENT_LENGTH"] = config.max_body_bytes
    metrics = RouterMetrics()
    prefill = make_pool("prefill", config.prefill_urls, config)
    decode = make_pool("decode", config.decode_urls, config)
    proxy = Proxy(config, prefill, decode, NeuronFirstToken(), metrics)
    health = HealthMonitor(
        [prefill, decode],
        metrics,
        config.health_interval_s,
        config.health_timeout_s,
        proxy.default_authorization,
    )
    app.extensions["di_router"] = proxy

    @app.before_serving
    async def _startup() -> None:
        await health.poll_once()
        health.start()

    @app.after_serving
    async def _shutdown() -> None:
        await health.stop()
        await proxy.aclose()
        await prefill.aclose()
        await decode.aclose()

    @app.errorhandler(HTTPException)
    async def _http_error(exc: HTTPException) -> Response:
        status = exc.code or 500
        message = exc.description or exc.name
        if status == 413:
            message = f"The request body is larger than {config.max_body_bytes} bytes."
        return json_response(error_body(status, message), status)

    @app.post("/v1/completions")
    async def completions() -> Response:
        return await proxy.handle("completions", "/v1/completions")

    @app.post("/v1/chat/completions")
    async def chat_completions() -> Response:
        return await proxy.handle("chat", "/v1/chat/completions")

    @app.get("/v1/models")
    async def models() -> Response:
        backend = decode.pick()
        headers = {k: v for k, v in request.headers.items() if k.lower() == "authorization"}
        if "authorization" not in {k.lower() for k in headers} and proxy.default_authorization:
            headers["Authorization"] = proxy.default_authorization
        try:
            upstream = await backend.client.get(
                "/v1/models", headers=headers, timeout=config.connect_timeout_s
            )
        except httpx.HTTPError as exc:
            return json_response(
                error_body(502, f"decode server {backend.url} did not list models: {exc!r}"), 502
            )
        if upstream.status_code != 200:  # e.g. vLLM's 401 `{"error": "Unauthorized"}`
            status = upstream.status_code
            return json_response(normalise_error_body(status, upstream.content), status)
        return Response(
            upstream.content, status=upstream.status_code, content_type="application/json"
        )

    @app.get("/health")
    async def liveness() -> Response:
        return json_response({"status": "ok"})

    @app.get("/ready")
    async def readiness() -> Response:
        ready, report = health.readiness()
        return json_response({"ready": ready, **report}, 200 if ready else 503)

    @app.get("/version")
    async def version() -> Response:
        return json_response({"version": __version__, "protocol": proxy.strategy.name})

    @app.get("/metrics")
    async def metrics_route() -> Response:
        return Response(metrics.exposition(), content_type="text/plain; version=0.0.4")

    return app


def create_app_from_env() -> Quart:
    """Entry point for Hypercorn workers, which get the config through the environment."""
    from di_router.router.logs import configure_logging

    config = RouterConfig.model_validate(orjson.loads(os.environ[CONFIG_ENV]))
    configure_logging(config.log_level, config.log_format)
    return create_app(config)
