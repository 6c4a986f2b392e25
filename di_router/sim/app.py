"""The simulator's HTTP API: vLLM 0.7.2's OpenAI routes, health, version and metrics."""

from __future__ import annotations

import time
import uuid

from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from quart import Quart, Response, request
from werkzeug.exceptions import HTTPException

from di_router.sim.faults import install_faults
from di_router.sim.openai_serving import generate
from di_router.sim.registration import install_registration
from di_router.sim.server import SimServer
from di_router.sim.settings import SimSettings
from di_router.wire.responses import json_response

VLLM_VERSION = "2.24.0+neuron219"
"""What a source install of branch neuron-2.24-vllm-v0.7.2 reports: setup.py's
`get_vllm_version` takes setuptools-scm's version (the branch head is tagged 2.24.0) and appends
`+neuron` and the first three digits of the neuronx-cc version (2.19.x in Neuron SDK 2.24)."""


def create_app(settings: SimSettings) -> Quart:
    app = Quart("di_router.sim")
    app.config["RESPONSE_TIMEOUT"] = None
    app.config["BODY_TIMEOUT"] = None
    server = SimServer(settings)
    app.extensions["sim"] = server

    @app.before_serving
    async def _start() -> None:
        await server.start()

    @app.after_serving
    async def _stop() -> None:
        await server.stop()

    @app.before_request
    async def _auth() -> Response | None:
        if (
            settings.api_key
            and request.path.startswith("/v1")
            and request.headers.get("Authorization") != f"Bearer {settings.api_key}"
        ):
            return json_response({"error": "Unauthorized"}, 401)
        return None

    @app.route("/health")
    @app.route("/ping", methods=["GET", "POST"])
    async def health() -> Response:
        return Response(b"", 200)

    @app.errorhandler(404)
    @app.errorhandler(405)
    async def not_found(error: HTTPException) -> Response:
        # FastAPI's (Starlette's) JSON for routes and methods it does not serve.
        return json_response({"detail": error.name}, error.code or 404)

    @app.route("/version")
    async def version() -> Response:
        return json_response({"version": VLLM_VERSION})

    @app.route("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(server.metrics.registry), content_type=CONTENT_TYPE_LATEST)

    @app.route("/sim/stats")
    async def stats() -> Response:
        return json_response(server.stats())

    @app.route("/v1/models")
    async def models() -> Response:
        now = int(time.time())
        cards = [
            {
                "id": name,
                "object": "model",
                "created": now,
                "owned_by": "vllm",
                "root": settings.model,
                "parent": None,
                "max_model_len": settings.max_model_len,
                "permission": [
                    {
                        "id": f"modelperm-{uuid.uuid4().hex}",
                        "object": "model_permission",
                        "created": now,
                        "allow_create_engine": False,
                        "allow_sampling": True,
                        "allow_logprobs": True,
                        "allow_search_indices": False,
                        "allow_view": True,
                        "allow_fine_tuning": False,
                        "organization": "*",
                        "group": None,
                        "is_blocking": False,
                    }
                ],
            }
            for name in (settings.served_model_names or (settings.model,))
        ]
        return json_response({"object": "list", "data": cards})

    @app.post("/v1/completions")
    async def completions() -> Response:
        return await generate(server, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions() -> Response:
        return await generate(server, chat=True)

    install_faults(app, settings.faults)
    install_registration(app, settings)  # after _start: registers once paired
    return app
