"""The HTTP surface of vLLM 0.7.2: routes, ids, SSE framing, usage chunks, errors, metrics."""

from __future__ import annotations

import httpx
import pytest

from di_router.sim.app import VLLM_VERSION
from tests.sim.conftest import (
    CHAT,
    COMPLETIONS,
    MODEL,
    chat_body,
    completion_body,
    metrics,
    post,
    sim_proc,
    stream,
    texts,
)
from tests.support import running


def test_health_ping_version(trio):
    for proc in trio:
        assert httpx.get(proc.url + "/health").status_code == 200
        assert httpx.get(proc.url + "/ping").status_code == 200
        assert httpx.post(proc.url + "/ping").status_code == 200
        assert httpx.get(proc.url + "/version").json() == {"version": VLLM_VERSION}


def test_models_lists_the_served_model(trio):
    body = httpx.get(trio[0].url + "/v1/models").json()
    assert body["object"] == "list"
    [card] = body["data"]
    assert card["id"] == MODEL and card["object"] == "model" and card["owned_by"] == "vllm"
    assert card["root"] == MODEL and card["max_model_len"] == 8192 and card["parent"] is None
    assert card["permission"][0]["object"] == "model_permission"


def test_completion_non_streaming_shape_and_id_from_header(trio):
    baseline = trio[0]
    resp = post(baseline, COMPLETIONS, completion_body("the sky is", 5), rid="abc-1")
    assert resp.status_code == 200
    body = resp.json()
    assert body["id"] == "cmpl-abc-1"
    assert body["object"] == "text_completion" and body["model"] == MODEL
    [choice] = body["choices"]
    assert set(choice) == {
        "index", "text", "logprobs", "finish_reason", "stop_reason", "prompt_logprobs"
    }  # fmt: skip
    assert choice["finish_reason"] == "length" and choice["stop_reason"] is None
    assert len(choice["text"].split()) == 5
    # "the sky is" = BOS + 3 words.
    assert body["usage"] == {
        "prompt_tokens": 4, "total_tokens": 9, "completion_tokens": 5,
        "prompt_tokens_details": None,
    }  # fmt: skip


def test_completion_without_header_gets_random_hex_id(trio):
    body = post(trio[0], COMPLETIONS, completion_body("x", 1)).json()
    rand = body["id"].removeprefix("cmpl-")
    assert body["id"].startswith("cmpl-") and len(rand) == 32 and int(rand, 16) >= 0


def test_completion_list_of_prompts(trio):
    baseline = trio[0]
    prompts = ["a tornado is a", "the sky", "one two three four"]
    body = post(baseline, COMPLETIONS, completion_body(prompts, 4)).json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    singles = [post(baseline, COMPLETIONS, completion_body(p, 4)).json() for p in prompts]
    assert [c["text"] for c in body["choices"]] == [s["choices"][0]["text"] for s in singles]
    assert body["usage"]["prompt_tokens"] == 5 + 3 + 5
    assert body["usage"]["completion_tokens"] == 12


def test_chat_non_streaming_shape(trio):
    resp = post(trio[0], CHAT, chat_body("hello", 3), rid="chat-1")
    body = resp.json()
    assert body["id"] == "chatcmpl-chat-1" and body["object"] == "chat.completion"
    assert body["prompt_logprobs"] is None
    [choice] = body["choices"]
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["tool_calls"] == [] and choice["message"]["reasoning_content"] is None
    assert len(choice["message"]["content"].split()) == 3
    assert choice["finish_reason"] == "length" and choice["stop_reason"] is None


def test_completion_stream_framing_and_no_usage_by_default(trio):
    chunks, result = stream(trio[0], COMPLETIONS, completion_body("the sky is", 5), rid="s-1")
    assert chunks[0]["id"] == "cmpl-s-1"
    assert len(chunks) == 5  # one chunk per token, no usage chunk
    assert all(c["usage"] is None for c in chunks)  # 0.7.2 completions: usage key, null
    assert result["finish"] == {0: "length"} and result["usage"] is None
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * 4 + ["length"]
    full = post(trio[0], COMPLETIONS, completion_body("the sky is", 5)).json()
    assert result["text"][0] == full["choices"][0]["text"]


def test_chat_stream_role_chunk_comes_with_first_token(trio):
    chunks, result = stream(trio[0], CHAT, chat_body("hello", 4), rid="s-2")
    assert chunks[0]["id"] == "chatcmpl-s-2"
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[1]["choices"][0]["delta"]["content"]  # the first token right after
    assert len(chunks) == 1 + 4
    assert all("usage" not in c for c in chunks)
    assert "stop_reason" not in chunks[1]["choices"][0]  # only on the final chunk
    assert chunks[-1]["choices"][0]["stop_reason"] is None
    assert result["finish"] == {0: "length"}
    full = post(trio[0], CHAT, chat_body("hello", 4)).json()
    assert result["text"][0] == full["choices"][0]["message"]["content"]


@pytest.mark.parametrize("path", [COMPLETIONS, CHAT])
def test_usage_chunk_only_with_include_usage(trio, path):
    make = chat_body if path == CHAT else completion_body
    body = make("count me", 3, stream_options={"include_usage": True})
    chunks, result = stream(trio[0], path, body)
    assert chunks[-1]["choices"] == []
    assert result["usage"]["completion_tokens"] == 3
    assert result["usage"]["total_tokens"] == result["usage"]["prompt_tokens"] + 3
    # 0.7.2: a stream_options object alone turns usage on; include_usage=false turns it off.
    assert stream(trio[0], path, {**body, "stream_options": {}})[1]["usage"] == result["usage"]
    off = stream(trio[0], path, {**body, "stream_options": {"include_usage": False}})[1]
    assert off["usage"] is None


def test_continuous_usage_counts_every_token(trio):
    opts = {"include_usage": True, "continuous_usage_stats": True}
    chunks, _ = stream(trio[0], CHAT, chat_body("count me", 4, stream_options=opts))
    assert [c["usage"]["completion_tokens"] for c in chunks] == [0, 1, 2, 3, 4, 4]


def test_stream_of_list_prompts_interleaves_indices(trio):
    body = completion_body(["a b", "c"], 3)
    chunks, result = stream(trio[0], COMPLETIONS, body)
    assert sorted(result["text"]) == [0, 1]
    assert [result["text"][i] for i in (0, 1)] == texts(post(trio[0], COMPLETIONS, body))
    assert result["finish"] == {0: "length", 1: "length"}
    assert len(chunks) == 6


# -- errors --------------------------------------------------------------------------------------
def _assert_error(resp: httpx.Response, status: int, contains: str):
    """vLLM 0.7.2's ErrorResponse; `param` is always null (create_error_response never sets it)."""
    body = resp.json()
    assert resp.status_code == status, body
    assert set(body) == {"object", "message", "type", "param", "code"}
    assert body["object"] == "error" and body["code"] == status and body["param"] is None
    assert contains in body["message"]


@pytest.mark.parametrize(
    ("change", "contains"),
    [
        ({"max_tokens": "many"}, "valid integer"),
        ({"prompt": None}, "prompt"),
        ({"temperature": -1}, "temperature"),
        ({"max_tokens": 3, "min_tokens": 4}, "min_tokens"),
        ({"max_tokens": 8190}, "maximum context length is 8192"),
        ({"stream_options": {"include_usage": True}}, "stream=True"),
        ({"suffix": "!"}, "suffix"),
    ],
)
def test_invalid_completion_requests_are_400(trio, change, contains):
    body = {**completion_body("a b c d", 4), **change}
    _assert_error(post(trio[0], COMPLETIONS, body), 400, contains)


def test_chat_errors(trio):
    _assert_error(post(trio[0], CHAT, {"model": MODEL, "messages": []}), 400, "messages")
    resp = post(trio[0], CHAT, {**chat_body("hi", 2), "max_completion_tokens": 9000})
    _assert_error(resp, 400, "maximum context length")


def test_unknown_model_is_404(trio):
    resp = post(trio[0], COMPLETIONS, {**completion_body("x", 2), "model": "gpt-4"})
    _assert_error(resp, 404, "The model `gpt-4` does not exist.")


def test_unknown_model_is_checked_before_lengths(trio):
    """vLLM 0.7.2 validates the schema (400), then the model (404), then lengths (400)."""
    too_long = {**completion_body("x", 9000), "model": "gpt-4"}
    _assert_error(post(trio[0], COMPLETIONS, too_long), 404, "gpt-4")
    bad_schema = {**completion_body("x", "many"), "model": "gpt-4"}
    _assert_error(post(trio[0], COMPLETIONS, bad_schema), 400, "max_tokens")


def test_malformed_json_is_400(trio):
    resp = httpx.post(trio[0].url + COMPLETIONS, content=b"{nope")
    _assert_error(resp, 400, "JSON")


def test_unknown_fields_are_accepted(trio):
    body = completion_body("x", 2, user="u", top_k=5, priority=0, guided_json=None)
    assert post(trio[0], COMPLETIONS, body).status_code == 200


# -- metrics -------------------------------------------------------------------------------------
def test_metrics_count_requests_and_tokens(trio):
    baseline = trio[0]
    before = metrics(baseline)
    post(baseline, COMPLETIONS, completion_body("one two", 6))
    after = metrics(baseline)
    assert after["vllm:num_requests_running"] == 0 and after["vllm:num_requests_waiting"] == 0
    assert after["vllm:time_to_first_token_seconds_count"] == (
        before["vllm:time_to_first_token_seconds_count"] + 1
    )
    assert after["vllm:generation_tokens_total"] == before["vllm:generation_tokens_total"] + 6
    assert after["vllm:prompt_tokens_total"] == before["vllm:prompt_tokens_total"] + 3
    assert after["vllm:e2e_request_latency_seconds_count"] == (
        before["vllm:e2e_request_latency_seconds_count"] + 1
    )
    for name in ("vllm:num_requests_swapped", "vllm:gpu_cache_usage_perc"):
        assert name in after


# -- API key and served model name ---------------------------------------------------------------
@pytest.fixture(scope="module")
def keyed():
    proc = sim_proc(
        "keyed",
        ["--sim-profile", "instant", "--host", "127.0.0.1", "--served-model-name", "alias", "x2"],
        env={"VLLM_API_KEY": "sekrit"},
    )
    with running(proc):
        yield proc


def test_api_key_from_env_guards_v1_only(keyed):
    body = {**completion_body("x", 2), "model": "alias"}
    wrong = httpx.post(keyed.url + COMPLETIONS, json=body, headers={"Authorization": "Bearer no"})
    assert wrong.status_code == 401 and wrong.json() == {"error": "Unauthorized"}
    assert httpx.post(keyed.url + COMPLETIONS, json=body).status_code == 401
    assert httpx.get(keyed.url + "/v1/models").status_code == 401
    ok = httpx.post(keyed.url + COMPLETIONS, json=body, headers={"Authorization": "Bearer sekrit"})
    assert ok.status_code == 200 and ok.json()["model"] == "alias"
    assert httpx.get(keyed.url + "/health").status_code == 200  # not under /v1
    assert httpx.get(keyed.url + "/metrics").status_code == 200


def test_served_model_names(keyed):
    auth = {"Authorization": "Bearer sekrit"}
    ids = [m["id"] for m in httpx.get(keyed.url + "/v1/models", headers=auth).json()["data"]]
    assert ids == ["alias", "x2"]
    resp = httpx.post(keyed.url + COMPLETIONS, json=completion_body("x", 2), headers=auth)
    assert resp.status_code == 404  # the --model path is not a served name any more
    assert 'model_name="alias"' in httpx.get(keyed.url + "/metrics").text
