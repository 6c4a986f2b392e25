"""JSON responses as the router sends them (errors included), with its request id."""

from __future__ import annotations

from typing import Any

import orjson
from quart import Response


def json_response(body: Any, status: int = 200, request_id: str | None = None) -> Response:
    response = Response(orjson.dumps(body), status=status, content_type="application/json")
    if request_id:
        response.headers["X-Request-Id"] = request_id
    return response
