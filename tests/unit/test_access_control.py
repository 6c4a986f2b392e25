"""`AccessControl` and W3C trace headers: who may use the router, and what the backends are told
on a client's behalf."""

from __future__ import annotations

import hmac
from collections.abc import Callable

import pytest

from di_router.router.access_control import AccessControl, trace_headers

PARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


@pytest.mark.parametrize(
    ("authorization", "allowed"),
    [("Bearer k1", True), ("Bearer k2", True), ("bearer k2", True), ("BEARER k1", True),
     ("Bearer  k1 ", True), ("Bearer k3", False), ("Bearer k", False), ("Bearer k1x", False),
     ("k1", False), ("Basic k1", False), ("Bearer ", False), ("", False), (None, False)],
)  # fmt: skip
def test_bearer_keys(authorization: str | None, allowed: bool) -> None:
    assert AccessControl(["k1", "k2"], None).allows(authorization) is allowed


def test_no_keys_is_open_and_empty_keys_do_not_count() -> None:
    assert not AccessControl([], None).enabled
    assert not AccessControl([""], None).enabled
    assert AccessControl([""], None).allows(None)
    assert not AccessControl(["", "k"], None).allows("Bearer ")


@pytest.mark.parametrize("authorization", ["Bearer k1", "Bearer k3", "Bearer k2", None])
def test_every_key_is_compared_whatever_matches(
    authorization: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No early exit: the time taken does not tell which key (or how much of one) matched."""
    calls: list[tuple[bytes, bytes]] = []
    real: Callable[[bytes, bytes], bool] = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counting)  # looked up at each call
    AccessControl(["k1", "k2", "k3"], None).allows(authorization)
    assert [key for _, key in calls] == [b"k1", b"k2", b"k3"]


def test_backend_key_only_for_clients_the_router_authenticated() -> None:
    guarded = AccessControl(["client-key"], "backend-key")
    assert guarded.upstream_authorization({"authorization": "Bearer client-key"}) == (
        "Bearer backend-key"
    )
    assert guarded.backend_authorization == "Bearer backend-key"
    # An open router never lends its backend key: the client's own header (or none) goes on.
    open_router = AccessControl([], "backend-key")
    assert open_router.upstream_authorization({}) is None
    assert open_router.upstream_authorization({"authorization": "Bearer mine"}) == "Bearer mine"
    assert open_router.backend_authorization == "Bearer backend-key"  # health checks only


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"traceparent": PARENT}, {"traceparent": PARENT}),
        ({"traceparent": PARENT, "tracestate": "vendor=a,other=b"},
         {"traceparent": PARENT, "tracestate": "vendor=a,other=b"}),
        ({"traceparent": PARENT + "-ab-cd"}, {"traceparent": PARENT + "-ab-cd"}),
        ({"traceparent": PARENT.upper()}, {}),
        ({"traceparent": PARENT[:-1]}, {}),
        ({"traceparent": PARENT + "\n"}, {}),
        ({"traceparent": PARENT + "-" + "a" * 300}, {}),
        ({"tracestate": "vendor=a"}, {}),
        ({"traceparent": PARENT, "tracestate": "bad\nline"}, {"traceparent": PARENT}),
        ({"traceparent": PARENT, "tracestate": "x" * 513}, {"traceparent": PARENT}),
        ({"traceparent": PARENT, "tracestate": "caf\u00e9"}, {"traceparent": PARENT}),
        ({"traceparent": PARENT, "tracestate": ""}, {"traceparent": PARENT}),
    ],
    ids=["parent", "state", "suffix", "upper", "short", "newline", "long", "state-alone",
         "state-newline", "state-long", "state-non-ascii", "state-empty"],
)  # fmt: skip
def test_trace_headers_forwarded_only_when_well_formed(
    headers: dict[str, str], expected: dict[str, str]
) -> None:
    assert trace_headers(headers) == expected
