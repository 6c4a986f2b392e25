"""Issue 3, points 6 and 9, and the brief's "bad input": auth passthrough, fields DI cannot
honour, malformed requests, and the router's own endpoints.

Bad input always gets an OpenAI-format JSON error with the right status (never a 500, a hang or
a truncated 200), the backends see nothing of it, and the router keeps serving afterwards.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.router.conftest import in_flight, is_openai_error, metric, wait_idle
from tests.sse_strict import assemble, check_chunks, parse_sse
from tests.support import MODEL, di_stack, running, sim_stats, start_router

MAX_BODY = 2000
PREFILL_MAX_LEN, DECODE_MAX_LEN = 4096, 8192


def completion(**extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "prompt": "hello there", "max_tokens": 4, "temperature": 0, **extra}


def chat(**extra: Any) -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 4,
        "temperature": 0,
        **extra,
    }


# -- 6. auth passthrough -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def auth():
    """Sims that require `secret`; router `plain` has no key, router `keyed` has the backends'
    key in OPENAI_API_KEY but no client keys, router `gated` requires the client key `door`."""
    key = ["--api-key", "secret"]
    with di_stack(prefill_extra=key, decode_extra=key, env={"OPENAI_API_KEY": ""}) as s:
        keyed = start_router(
            s.prefill,
            s.decode,
            extra=["--health-interval", "0.2"],
            env={"OPENAI_API_KEY": "secret"},
        )
        gated = start_router(
            s.prefill,
            s.decode,
            extra=["--health-interval", "0.2", "--api-key", "door"],
            env={"OPENAI_API_KEY": "secret"},
        )
        with running(keyed), running(gated):
            yield s, keyed, gated


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("endpoint", ["completions", "chat/completions"])
def test_client_bearer_is_forwarded_to_both_legs(auth, stream, endpoint):
    s, _, _ = auth
    body = (completion if endpoint == "completions" else chat)(stream=stream)
    got = httpx.post(
        f"{s.router.url}/v1/{endpoint}",
        json=body,
        headers={"Authorization": "Bearer secret"},
        timeout=10,
    )
    assert got.status_code == 200, got.text
    if stream:
        chunks = parse_sse(got.content)
        check_chunks(chunks, chat=endpoint != "completions")
    # Both legs were accepted: prefill produced a KV entry and decode pulled it.
    stats = wait_idle(s.router, s.prefill, s.decode)
    assert stats[s.prefill]["kv"]["produced"] == stats[s.prefill]["kv"]["pulled"] >= 1


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("authorization", ["Bearer wrong", None])
def test_wrong_or_missing_key_is_401(auth, stream, authorization):
    s, _, _ = auth
    headers = {"Authorization": authorization} if authorization else {}
    before = sim_stats(s.prefill)["kv"]
    got = httpx.post(
        s.router.url + "/v1/completions",
        json=completion(stream=stream),
        headers=headers,
        timeout=10,
    )
    is_openai_error(got, 401)
    wait_idle(s.router, s.prefill, s.decode)
    assert sim_stats(s.prefill)["kv"] == before
    # A rejected request is the client's error, not a failing backend.
    assert (
        metric(s.router, "di_router_upstream_errors_total", role="prefill", error_type="http_401")
        == 0
    )


@pytest.mark.parametrize("stream", [False, True])
def test_backend_key_is_never_sent_for_an_unauthenticated_client(auth, stream):
    """OPENAI_API_KEY on a router without client keys used to make it an open relay: a client
    with no Authorization header got the router's key forwarded and a 200."""
    s, keyed, _ = auth
    before = sim_stats(s.prefill)["kv"]
    got = httpx.post(keyed.url + "/v1/completions", json=completion(stream=stream), timeout=10)
    is_openai_error(got, 401)
    wait_idle(keyed, s.prefill, s.decode)
    assert sim_stats(s.prefill)["kv"] == before
    # A client that brings the backends' own key is served as before.
    got = httpx.post(
        keyed.url + "/v1/completions",
        json=completion(stream=stream),
        headers={"Authorization": "Bearer secret"},
        timeout=10,
    )
    assert got.status_code == 200, got.text
    wait_idle(keyed, s.prefill, s.decode)


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("authorization", [None, "Bearer secret", "Bearer doorx", "Basic door"])
def test_router_keys_gate_v1_before_any_backend_work(auth, stream, authorization):
    s, _, gated = auth
    before = sim_stats(s.prefill)["kv"]
    headers = {"Authorization": authorization} if authorization else {}
    got = httpx.post(
        gated.url + "/v1/completions", json=completion(stream=stream), headers=headers, timeout=10
    )
    is_openai_error(got, 401)
    assert sim_stats(s.prefill)["kv"] == before
    is_openai_error(httpx.get(gated.url + "/v1/models", headers=headers), 401)


@pytest.mark.parametrize("stream", [False, True])
def test_authenticated_client_is_served_with_the_backend_key(auth, stream):
    s, _, gated = auth
    got = httpx.post(
        gated.url + "/v1/chat/completions",
        json=chat(stream=stream),
        headers={"Authorization": "Bearer door"},
        timeout=10,
    )
    assert got.status_code == 200, got.text
    wait_idle(gated, s.prefill, s.decode)
    models = httpx.get(gated.url + "/v1/models", headers={"Authorization": "Bearer door"})
    assert models.status_code == 200 and models.json()["data"][0]["id"] == MODEL
    for open_path in ("/health", "/ready", "/metrics"):
        assert httpx.get(gated.url + open_path).status_code == 200, open_path


def test_models_auth(auth):
    s, keyed, _ = auth
    ok = httpx.get(s.router.url + "/v1/models", headers={"Authorization": "Bearer secret"})
    assert ok.status_code == 200 and ok.json()["data"][0]["id"] == MODEL
    is_openai_error(httpx.get(s.router.url + "/v1/models"), 401)
    is_openai_error(
        httpx.get(s.router.url + "/v1/models", headers={"Authorization": "Bearer wrong"}), 401
    )
    is_openai_error(httpx.get(keyed.url + "/v1/models"), 401)


# -- 7/8/9: one plain stack with a small body limit ----------------------------------------------


@pytest.fixture(scope="module")
def plain():
    with di_stack(
        prefill_extra=["--max-model-len", str(PREFILL_MAX_LEN)],
        decode_extra=["--max-model-len", str(DECODE_MAX_LEN)],
        router_extra=["--max-body-bytes", str(MAX_BODY)],
    ) as s:
        yield s


def sims_snapshot(s) -> list[dict[str, Any]]:
    return [sim_stats(s.prefill), sim_stats(s.decode)]


UNSUPPORTED = [
    ("completions", {"n": 2}, "n"),
    ("chat/completions", {"n": 2}, "n"),
    ("completions", {"best_of": 2}, "best_of"),
    ("completions", {"use_beam_search": True}, "use_beam_search"),
    ("chat/completions", {"use_beam_search": True}, "use_beam_search"),
    ("completions", {"echo": True, "logprobs": 1}, "logprobs"),
    ("completions", {"echo": True, "logprobs": 0}, "logprobs"),
    ("completions", {"prompt_logprobs": 1}, "prompt_logprobs"),
    ("chat/completions", {"prompt_logprobs": 1}, "prompt_logprobs"),
]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(("endpoint", "fields", "param"), UNSUPPORTED)
def test_fields_di_cannot_honour_are_400_naming_the_field(plain, endpoint, fields, param, stream):
    before = sims_snapshot(plain)
    body = (completion if endpoint == "completions" else chat)(stream=stream, **fields)
    got = httpx.post(f"{plain.router.url}/v1/{endpoint}", json=body, timeout=10)
    err = is_openai_error(got, 400)
    assert err["param"] == param
    assert "disaggregated" in err["message"] or "decode server" in err["message"]
    assert got.headers["X-Request-Id"].startswith("cmpl-")
    # The router answered alone: the backends saw nothing.
    assert sims_snapshot(plain) == before
    assert in_flight(plain.router) == 0


@pytest.mark.parametrize("stream", [False, True])
def test_unknown_and_neutral_fields_pass_through(plain, stream):
    body = completion(
        stream=stream, top_k=50, x_custom=1, n=1, best_of=1, echo=False, use_beam_search=False
    )
    got = httpx.post(plain.router.url + "/v1/completions", json=body, timeout=10)
    assert got.status_code == 200, got.text
    if stream:
        chunks = parse_sse(got.content)
        check_chunks(chunks, chat=False)
        assert assemble(chunks, chat=False)["finish"] == {0: "length"}
    else:
        assert got.json()["usage"]["completion_tokens"] == 4
    wait_idle(plain.router, plain.prefill, plain.decode)


BAD_BODIES = [
    pytest.param(b"{not json", id="invalid-json"),
    pytest.param(b'[{"model": "x"}]', id="json-array"),
    pytest.param(b'"hello"', id="json-string"),
    pytest.param(b"null", id="json-null"),
    pytest.param(b"", id="empty"),
    pytest.param(b"\xff\xfe\x00garbage", id="binary"),
]


@pytest.mark.parametrize("endpoint", ["completions", "chat/completions"])
@pytest.mark.parametrize("raw", BAD_BODIES)
def test_malformed_bodies_are_400(plain, endpoint, raw):
    before = sims_snapshot(plain)
    got = httpx.post(
        f"{plain.router.url}/v1/{endpoint}",
        content=raw,
        headers={"Content-Type": "application/json"},
        timeout=10,
    )
    is_openai_error(got, 400)
    assert sims_snapshot(plain) == before
    assert in_flight(plain.router) == 0


def _oversized_json() -> bytes:
    return httpx.Request("POST", "/", json=completion(prompt="word " * MAX_BODY)).content


def test_oversized_body_is_413(plain):
    gone_before = metric(plain.router, "di_router_client_disconnects_total")
    before = sims_snapshot(plain)
    raw = _oversized_json()
    assert len(raw) > MAX_BODY
    got = httpx.post(
        plain.router.url + "/v1/completions",
        content=raw,
        headers={"Content-Type": "application/json"},
        timeout=10,
    )
    err = is_openai_error(got, 413)
    assert str(MAX_BODY) in err["message"]
    assert sims_snapshot(plain) == before
    assert in_flight(plain.router) == 0
    # A refused body is the client's error, not a client that went away.
    assert metric(plain.router, "di_router_client_disconnects_total") == gone_before
    assert metric(plain.router, "di_router_requests_total", status="413") >= 1


def test_oversized_chunked_body_is_413(plain):
    """No Content-Length: the limit is enforced while reading."""
    raw = _oversized_json()

    def chunks():
        for i in range(0, len(raw), 500):
            yield raw[i : i + 500]

    got = httpx.post(
        plain.router.url + "/v1/chat/completions",
        content=chunks(),
        headers={"Content-Type": "application/json"},
        timeout=10,
    )
    is_openai_error(got, 413)
    assert in_flight(plain.router) == 0


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/v1/completions", 405),
        ("GET", "/v1/chat/completions", 405),
        ("PUT", "/v1/completions", 405),
        ("POST", "/v1/models", 405),
        ("GET", "/v1/nothing-here", 404),
        ("POST", "/v1/embeddings", 404),
        ("GET", "/", 404),
    ],
)
def test_wrong_method_or_path(plain, method, path, status):
    got = httpx.request(method, plain.router.url + path, timeout=10)
    is_openai_error(got, status)


def test_router_still_serves_after_bad_input(plain):
    # Each bad request of this module was answered; none left a request or a slot behind.
    wait_idle(plain.router, plain.prefill, plain.decode)
    assert metric(plain.router, "di_router_requests_total", status="500") == 0
    got = httpx.post(plain.router.url + "/v1/completions", json=completion(), timeout=10)
    assert got.status_code == 200 and got.json()["usage"]["completion_tokens"] == 4


# -- 9. the router's own endpoints and request ids ---------------------------------------------


def test_health_version_models(plain):
    health = httpx.get(plain.router.url + "/health")
    assert health.status_code == 200
    ready = httpx.get(plain.router.url + "/ready")
    assert ready.status_code == 200 and ready.json()["ready"] is True
    version = httpx.get(plain.router.url + "/version")
    assert version.status_code == 200
    assert version.headers["content-type"].startswith("application/json")
    info = version.json()
    assert isinstance(info["version"], str) and info["version"]
    assert info["protocol"] == "neuron-first-token"
    # /v1/models comes from the decode server (its max_model_len differs from prefill's).
    models = httpx.get(plain.router.url + "/v1/models")
    assert models.status_code == 200
    data = models.json()
    direct = httpx.get(plain.decode.url + "/v1/models").json()
    assert data["object"] == "list"
    assert [(m["id"], m["root"], m["max_model_len"]) for m in data["data"]] == [
        (m["id"], m["root"], m["max_model_len"]) for m in direct["data"]
    ]
    assert data["data"][0]["max_model_len"] == DECODE_MAX_LEN


def test_request_id_header_matches_response_ids(plain):
    url = plain.router.url
    unary = httpx.post(url + "/v1/completions", json=completion(), timeout=10)
    rid = unary.headers["X-Request-Id"]
    assert rid.startswith("cmpl-") and unary.json()["id"] == rid
    stream = httpx.post(url + "/v1/completions", json=completion(stream=True), timeout=10)
    rid = stream.headers["X-Request-Id"]
    chunks = parse_sse(stream.content)
    check_chunks(chunks, chat=False)
    assert {c["id"] for c in chunks} == {rid}
    chat_stream = httpx.post(url + "/v1/chat/completions", json=chat(stream=True), timeout=10)
    rid = chat_stream.headers["X-Request-Id"]
    chunks = parse_sse(chat_stream.content)
    check_chunks(chunks, chat=True)
    assert {c["id"] for c in chunks} == {"chat" + rid}  # chatcmpl-<same hex>
    chat_unary = httpx.post(url + "/v1/chat/completions", json=chat(), timeout=10)
    assert chat_unary.json()["id"] == "chat" + chat_unary.headers["X-Request-Id"]
    # Distinct requests get distinct ids, whatever id the client sends.
    again = httpx.post(
        url + "/v1/completions", json=completion(), headers={"X-Request-Id": "client-1"}, timeout=10
    )
    twice = httpx.post(
        url + "/v1/completions", json=completion(), headers={"X-Request-Id": "client-1"}, timeout=10
    )
    assert again.status_code == twice.status_code == 200
    assert again.headers["X-Request-Id"] != twice.headers["X-Request-Id"]
    wait_idle(plain.router, plain.prefill, plain.decode)


def test_model_label_is_learned_with_the_routers_key(auth):
    """The health monitor lists models with the router's key, so labels name the real model."""
    _, keyed, _ = auth
    before = metric(keyed, "di_router_requests_total", model_name=MODEL, status="200")
    got = httpx.post(
        keyed.url + "/v1/completions",
        json=completion(stream=False),
        headers={"Authorization": "Bearer secret"},
        timeout=10,
    )
    assert got.status_code == 200, got.text
    after = metric(keyed, "di_router_requests_total", model_name=MODEL, status="200")
    assert after == before + 1
