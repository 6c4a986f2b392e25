"""Issue 4, logs: one access line per request, as text (default) or JSON lines (a flag).

Each line carries the router's id (also returned as the response's X-Request-Id), the client's
X-Request-Id, endpoint, status, tokens, TTFT / prefill / hand-off / total time and how the
request ended: ok, upstream error or client disconnect.
"""

from __future__ import annotations

import json
import re
from typing import Any

import httpx
import pytest

from tests.observability.conftest import wait_settled
from tests.sse_strict import parse_sse
from tests.support import MODEL, Proc, di_stack, wait_until

KEYS = (
    "router_id",
    "client_request_id",
    "endpoint",
    "status",
    "prompt_tokens",
    "completion_tokens",
    "ttft_ms",
    "prefill_ms",
    "handoff_ms",
    "total_ms",
    "outcome",
)
SIM_FLAGS = {
    "prefill_extra": ["--sim-prefill-per-token-us", "5000"],
    "decode_extra": ["--sim-kv-timeout", "0.8"],
}
LONG_PROMPT = " ".join(["word"] * 300)  # 1.5 s of prefill: decode's KV wait (0.8 s) fails first
# The client's id has a space and an "=": the text line must not split it nor forge a field.
CLIENT_OK = "client ok status=999"
CLIENT_FAIL, CLIENT_GONE = "client-fail-1", "client-gone-1"
TEXT_FIELD = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S*)')


def body(prompt: str, stream: bool) -> dict[str, Any]:
    extra = {"stream_options": {"include_usage": True}} if stream else {}
    return {
        "model": MODEL,
        "prompt": prompt,
        "max_tokens": 5,
        "temperature": 0,
        "stream": stream,
        **extra,
    }


def send_mix(router: Proc) -> dict[str, Any]:
    """ok (streamed), upstream error, client disconnect; returns what the client saw."""
    url = router.url + "/v1/completions"
    ok = httpx.post(
        url, json=body("hello there", True), headers={"X-Request-Id": CLIENT_OK}, timeout=30
    )
    assert ok.status_code == 200, ok.text
    usage = next(c["usage"] for c in parse_sse(ok.content) if c.get("usage"))
    fail = httpx.post(
        url, json=body(LONG_PROMPT, False), headers={"X-Request-Id": CLIENT_FAIL}, timeout=30
    )
    assert fail.status_code == 502, fail.text
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            url, json=body(LONG_PROMPT, True), headers={"X-Request-Id": CLIENT_GONE}, timeout=0.2
        )
    wait_settled(router, 3)
    return {
        "ok_id": ok.headers["X-Request-Id"],
        "usage": usage,
        "fail_id": fail.headers["X-Request-Id"],
    }


def parse_text_line(line: str) -> dict[str, Any]:
    record: dict[str, Any] = {}
    for key, raw in TEXT_FIELD.findall(line.split("di_router.access:", 1)[1]):
        assert key not in record, f"field {key} twice in {line!r}"
        record[key] = json.loads(raw) if raw.startswith('"') else (None if raw == "-" else raw)
    return record


def check_records(records: list[dict[str, Any]], seen: dict[str, Any]) -> None:
    assert len(records) == 3, records  # exactly one line per request
    for record in records:
        assert set(KEYS) <= set(record), record
    by_client = {r["client_request_id"]: r for r in records}
    assert set(by_client) == {CLIENT_OK, CLIENT_FAIL, CLIENT_GONE}

    ok = by_client[CLIENT_OK]
    assert ok["router_id"] == seen["ok_id"] != CLIENT_OK
    assert (ok["endpoint"], str(ok["status"]), ok["outcome"]) == ("completions", "200", "ok")
    assert int(ok["prompt_tokens"]) == seen["usage"]["prompt_tokens"]
    assert int(ok["completion_tokens"]) == seen["usage"]["completion_tokens"] == 5
    times = {k: float(ok[k]) for k in ("ttft_ms", "prefill_ms", "handoff_ms", "total_ms")}
    assert all(t >= 0 for t in times.values()), times
    assert times["prefill_ms"] <= times["ttft_ms"] <= times["total_ms"], times
    assert times["ttft_ms"] + times["handoff_ms"] <= times["total_ms"], times

    fail = by_client[CLIENT_FAIL]
    assert fail["router_id"] == seen["fail_id"]
    assert (str(fail["status"]), fail["outcome"]) == ("502", "upstream_error")
    assert fail["error"] == "decode:stream_error"  # decode is read as a stream
    assert float(fail["total_ms"]) >= 800  # decode's KV wait
    assert fail["ttft_ms"] is None and fail["handoff_ms"] is None

    gone = by_client[CLIENT_GONE]
    assert (str(gone["status"]), gone["outcome"]) == ("499", "client_disconnect")
    assert re.fullmatch(r"cmpl-[0-9a-f]{32}", gone["router_id"])
    assert gone["ttft_ms"] is None and int(gone["completion_tokens"]) == 0
    assert len({r["router_id"] for r in records}) == 3


def test_text_access_lines():
    with di_stack(**SIM_FLAGS) as stack:
        seen = send_mix(stack.router)

        def lines() -> list[str] | None:
            found = [ln for ln in stack.router.log().splitlines() if "di_router.access:" in ln]
            return found if len(found) >= 3 else None

        found = wait_until(lines, 5, "three access lines")
    check_records([parse_text_line(line) for line in found], seen)


def test_json_access_lines_alone_on_stdout(tmp_path):
    stderr = tmp_path / "router.stderr"
    with di_stack(
        **SIM_FLAGS, router_extra=["--log-format", "json"], router_stderr=stderr
    ) as stack:
        seen = send_mix(stack.router)

        def records() -> list[dict[str, Any]] | None:
            out = [json.loads(ln) for ln in stack.router.log().splitlines() if ln.startswith("{")]
            return out if len(out) >= 3 else None

        found = wait_until(records, 5, "three JSON access lines on stdout")
        stdout = stack.router.log().splitlines()
    # Nothing else on stdout but the startup banner; the other logs went to stderr.
    others = [ln for ln in stdout if ln and not ln.startswith("{")]
    assert all(ln.startswith("di-router ready on ") for ln in others), others
    assert "di_router.access" not in stderr.read_text()
    assert "di_router.health" in stderr.read_text()
    check_records(found, seen)
    for record in found:
        assert isinstance(record["status"], int) and isinstance(record["completion_tokens"], int)
