"""OpenAI-format errors in vLLM 0.7.2's flat shape, with HTTP status = `code`."""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    404: "NotFoundError",
    408: "RequestTimeoutError",
    413: "RequestEntityTooLargeError",
    429: "RateLimitError",
    500: "InternalServerError",
    502: "BadGatewayError",
    503: "ServiceUnavailableError",
    504: "GatewayTimeoutError",
}


def _type_of(status: int) -> str:
    """`NotImplementedError` for 501; statuses outside the standard (a CDN's 520) are `APIError`."""
    try:
        return HTTPStatus(status).phrase.replace(" ", "") + "Error"
    except ValueError:
        return "APIError"


def error_body(status: int, message: str, param: str | None = None) -> dict[str, Any]:
    """The body vLLM 0.7.2 sends for an error, e.g. `{"object":"error",...,"code":400}`."""
    err_type = _TYPES.get(status) or _type_of(status)
    return {"object": "error", "message": message, "type": err_type, "param": param, "code": status}


def stream_error_payload(status: int, message: str) -> dict[str, Any]:
    """What vLLM sends as the last `data:` event when a stream fails after it started."""
    return {"error": error_body(status, message)}
