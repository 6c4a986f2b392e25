"""One access line per request, as text (key=value) or JSON lines."""

from __future__ import annotations

import logging
import re

import orjson

from di_router.router.trace import RequestTrace

log = logging.getLogger("di_router.access")
_NEEDS_QUOTES = re.compile(r'[\s"=\\]')


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


def access_record(trace: RequestTrace) -> dict[str, object]:
    return {
        "router_id": trace.router_id,
        "client_request_id": trace.client_request_id,
        "endpoint": trace.endpoint,
        "stream": trace.stream,
        "status": trace.status,
        "prompt_tokens": trace.prompt_tokens,
        "completion_tokens": trace.completion_tokens,
        "ttft_ms": _ms(trace.ttft),
        "prefill_ms": _ms(trace.prefill_latency),
        "handoff_ms": _ms(trace.kv_handoff),
        "total_ms": _ms(trace.e2e),
        "outcome": str(trace.outcome),
        "error": f"{trace.error_role}:{trace.error_type}" if trace.error_role else None,
    }


def _text_value(value: object) -> str:
    """`-` for none; a JSON string when needed (logfmt), so a client's X-Request-Id with
    spaces or `=` can neither break the line apart nor forge another field."""
    if value is None:
        return "-"
    text = str(value)
    if text in ("", "-") or _NEEDS_QUOTES.search(text):
        return orjson.dumps(text).decode()
    return text


def write_access_line(trace: RequestTrace, json_lines: bool) -> None:
    record = access_record(trace)
    if json_lines:
        log.info(orjson.dumps(record).decode())
    else:
        log.info(" ".join(f"{k}={_text_value(v)}" for k, v in record.items()))
