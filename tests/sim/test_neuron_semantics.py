"""The simulator fails like Neuron's vLLM 0.7.2 fork, by default (issue 9, points 1-7).

Every reference is to branch neuron-2.24-vllm-v0.7.2 of aws-neuron/upstreaming-to-vllm.
"""

from __future__ import annotations

import re
import socket

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.sim.conftest import (
    CHAT,
    COMPLETIONS,
    MODEL,
    chat_body,
    completion_body,
    kv_config,
    metrics,
    open_then_close,
    paired,
    post,
    sim_proc,
    start_pair,
    stream,
    texts,
)
from tests.support import free_port, running, samples, scrape, sim_stats, wait_until


@pytest.fixture(scope="module")
def four_slots():
    """The tutorial's `--max-num-seqs 4` on decode."""
    prefill, decode = start_pair(decode_extra=["--max-num-seqs", "4"])
    with running(prefill, decode):
        yield prefill, decode


def _idle(proc) -> dict:
    return wait_until(
        lambda: (s := sim_stats(proc))["slots_in_use"] == 0 and s["transferring"] == 0 and s,
        10,
        f"{proc.name}: no slot held",
    )


# -- 1, 2: a transferring decode request cannot be aborted ---------------------------------------
def test_abort_leaves_a_transferring_decode_request_to_run_when_its_kv_comes(four_slots):
    """`Scheduler.abort_seq_group` (vllm/core/scheduler.py) scans waiting, running and swapped,
    never `transferring`, and `NeuronBuffer.recv_handler` (vllm/distributed/kv_transfer/neuron/
    neuron_buffer.py) re-queues a failed lookup without end. So a client that leaves frees
    nothing; when the KV arrives the request runs to max_tokens with nobody listening."""
    prefill, decode = four_slots
    before = metrics(decode)
    body = completion_body("abandoned", 7)
    open_then_close(decode, COMPLETIONS, body, events=0, rid="abandoned")
    stats = wait_until(
        lambda: (s := sim_stats(decode))["aborts_ignored"] >= 1 and s, 5, "the ignored abort"
    )
    assert stats["transferring"] == 1 and stats["slots_in_use"] == 1 and stats["aborted"] == 0
    m = metrics(decode)
    assert m["vllm:num_requests_running"] == 0 and m["di_sim:num_requests_transferring"] == 1
    # Its KV arrives: it runs all 7 tokens and only then frees its slot.
    assert post(prefill, COMPLETIONS, {**body, "max_tokens": 1}, "abandoned").status_code == 200
    _idle(decode)
    _idle(prefill)
    after = metrics(decode)
    assert after["vllm:generation_tokens_total"] - before["vllm:generation_tokens_total"] == 7
    success = "vllm:request_success_total"  # no sample before the first success
    assert after[success] - before.get(success, 0) == 1


def test_cancelled_prefills_wedge_a_four_slot_decode_server(four_slots):
    """Point 2: four decode requests whose prefill never comes hold all four slots even after
    their clients left (see the test above for the references); a fifth request waits, and only
    requests still `waiting` can be aborted (`Scheduler.abort_seq_group` scans `waiting`)."""
    prefill, decode = four_slots
    body = completion_body("wedge", 3)
    for i in range(4):
        open_then_close(decode, COMPLETIONS, body, events=0, rid=f"wedge-{i}")
    wait_until(lambda: sim_stats(decode)["transferring"] == 4, 5, "4 requests transferring")
    with pytest.raises(httpx.ReadTimeout):  # the fifth waits for a slot, then its client leaves
        httpx.post(decode.url + COMPLETIONS, json=body, headers={"X-Request-Id": "5th"}, timeout=1)
    stats = wait_until(lambda: (s := sim_stats(decode))["aborted"] == 1 and s, 5, "5th aborted")
    assert stats["waiting"] == 0 and stats["slots_in_use"] == 4 and stats["transferring"] == 4
    # The server stays wedged until the four prefills come after all.
    for i in range(4):
        post(prefill, COMPLETIONS, {**body, "max_tokens": 1}, f"wedge-{i}")
    _idle(decode)
    p, d = paired(prefill, decode, COMPLETIONS, body, "after-wedge")
    assert p.status_code == 200 and d.status_code == 200


def test_a_second_prefill_under_an_unpulled_id_ends_the_engine_once_pulled():
    """Two prefill requests under one id before decode pulls: `NeuronBuffer.async_send_kv_caches`
    replaces `lookup_dict[request_id]`, both sequence groups wait in `transferring`, and once
    the entry is pulled `Scheduler.free_transferred_seq_groups` frees the first, deletes the
    entry (`check_transfer_done(..., remove=True)`) and raises KeyError for the second: the
    engine's loop dies and vLLM's server shuts down (`entrypoints/launcher.py`)."""
    prefill, decode = start_pair()
    with running(prefill, decode):
        body = completion_body("twice", 3)
        for _ in range(2):
            assert post(prefill, COMPLETIONS, {**body, "max_tokens": 1}, "twice").status_code == 200
        assert sim_stats(prefill)["transferring"] == 2
        assert post(decode, COMPLETIONS, body, "twice").status_code == 200  # the pull
        wait_until(lambda: prefill.popen.poll() is not None, 10, "the producer's engine dies")
        assert prefill.popen.returncode == 3
        assert "KeyError('cmpl-twice-0') in free_transferred_seq_groups" in prefill.log()


# -- 3: startup handshake ------------------------------------------------------------------------
def _refuses_http(proc) -> bool:
    port = int(proc.url.rsplit(":", 1)[1])
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


def _sim(name: str, role: str, kv_port: int, *extra: str):
    kv = kv_config("kv_producer" if role == "prefill" else "kv_consumer", kv_port)
    args = ["--host", "127.0.0.1", "--sim-profile", "instant", "--kv-transfer-config", kv]
    return sim_proc(name, [*args, *extra])


def test_servers_bind_http_only_once_paired_and_refuse_a_second_consumer():
    """`NeuronBuffer.__init__` (neuron_buffer.py) blocks in the ZMQ REP/REQ handshake, called
    from the worker's `init_device` (vllm/worker/neuron_worker.py) before the API server binds:
    a producer waits for its consumer without a timeout. One producer pairs with one consumer."""
    kv_port = free_port()
    prefill = _sim("lonely-prefill", "prefill", kv_port)
    try:
        wait_until(lambda: "waiting for a consumer" in prefill.log(), 15, "the producer waiting")
        assert _refuses_http(prefill)
        decode = _sim("decode", "decode", kv_port)
        with running(prefill, decode):
            assert sim_stats(prefill)["kv_peer"] is not None
            second = _sim("second-decode", "decode", kv_port)
            try:
                wait_until(lambda: "refused" in second.log(), 15, "the second consumer refused")
                assert "already paired with the consumer at 127.0.0.1:" in second.log()
                assert _refuses_http(second)
            finally:
                second.stop()
            p, d = paired(prefill, decode, COMPLETIONS, completion_body("still paired", 3), "ok")
            assert p.status_code == 200 and d.status_code == 200
    finally:
        prefill.stop()


@pytest.mark.parametrize("kv_ip", ["127.0.0.1", "127.0.0.2"])
def test_consumer_with_a_wrong_kv_address_never_becomes_healthy_and_says_why(kv_ip):
    """The consumer's REQ socket connects to kv_ip:kv_port and waits for the handshake reply
    without a timeout (`NeuronBuffer.__init__`, neuron_buffer.py): a wrong kv_ip or kv_port
    means it never serves HTTP. The simulator logs why; `--sim-kv-handshake-timeout` (a
    departure, for tests and demos) makes it exit with the reason instead of waiting forever."""
    kv = kv_config("kv_consumer", free_port()).replace('"127.0.0.1"', f'"{kv_ip}"')
    args = ["--host", "127.0.0.1", "--kv-transfer-config", kv]
    lost = sim_proc("lost-decode", args)
    try:
        wait_until(lambda: "Connection refused" in lost.log(), 15, "the reason in the log")
        assert f"waiting to pair with the producer at {kv_ip}:" in lost.log()
        assert _refuses_http(lost) and lost.popen.poll() is None
    finally:
        lost.stop()
    bounded = sim_proc("bounded-decode", [*args, "--sim-kv-handshake-timeout", "0.5"])
    assert bounded.popen.wait(30) == 1
    assert "TimeoutError: KV handshake with the peer at" in bounded.log()


# -- 4: a producer generates max_tokens > 1 ------------------------------------------------------
def test_producer_generates_more_than_one_token_and_pins_the_finished_sequence(trio):
    """vLLM has no max_tokens check for a producer: it decodes on, and when the sequence
    finishes before its KV was pulled, `Scheduler.free_finished_seq_groups` (scheduler.py)
    moves it to `transferring` with its blocks until `free_transferred_seq_groups` sees the
    transfer done."""
    baseline, prefill, decode = trio
    body = completion_body("prefill runs on", 5)
    resp = post(prefill, COMPLETIONS, body, "five")
    assert texts(resp) == texts(post(baseline, COMPLETIONS, body))
    stats = sim_stats(prefill)
    assert stats["transferring"] >= 1 and stats["kv"]["pending"] >= 1
    assert metrics(prefill)["vllm:num_requests_running"] == 0
    assert texts(post(decode, COMPLETIONS, body, "five")) == texts(resp)
    _idle(prefill)


# -- 5: mid-stream errors ------------------------------------------------------------------------
def test_mid_stream_errors_are_bad_request_400(trio):
    """`OpenAIServing.create_streaming_error_response` (vllm/entrypoints/openai/
    serving_engine.py) defaults to BadRequestError/400 and serialises with `json.dumps`; every
    streaming generator sends it for whatever failed. Here: a streaming `echo`, which
    `completion_stream_generator` (serving_completion.py) fails with an AssertionError."""
    resp = post(
        trio[0], COMPLETIONS, {**completion_body("echo me", 3), "echo": True, "stream": True}
    )
    assert resp.status_code == 200
    assert resp.content == (
        b'data: {"error": {"object": "error", "message": "", "type": "BadRequestError", '
        b'"param": null, "code": 400}}\n\ndata: [DONE]\n\n'
    )


# -- 6: metrics ----------------------------------------------------------------------------------
VLLM_072_SERIES = {
    "vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:lora_requests_info",
    "vllm:num_requests_swapped", "vllm:gpu_cache_usage_perc", "vllm:cpu_cache_usage_perc",
    "vllm:cpu_prefix_cache_hit_rate", "vllm:gpu_prefix_cache_hit_rate",
    "vllm:num_preemptions", "vllm:prompt_tokens", "vllm:generation_tokens", "vllm:tokens",
    "vllm:iteration_tokens_total", "vllm:time_to_first_token_seconds",
    "vllm:time_per_output_token_seconds", "vllm:e2e_request_latency_seconds",
    "vllm:request_queue_time_seconds", "vllm:request_inference_time_seconds",
    "vllm:request_prefill_time_seconds", "vllm:request_decode_time_seconds",
    "vllm:time_in_queue_requests", "vllm:model_forward_time_milliseconds",
    "vllm:model_execute_time_milliseconds", "vllm:request_prompt_tokens",
    "vllm:request_generation_tokens", "vllm:request_max_num_generation_tokens",
    "vllm:request_params_n", "vllm:request_params_max_tokens", "vllm:request_success",
    "vllm:spec_decode_draft_acceptance_rate", "vllm:spec_decode_efficiency",
    "vllm:spec_decode_num_accepted_tokens", "vllm:spec_decode_num_draft_tokens",
    "vllm:spec_decode_num_emitted_tokens", "vllm:cache_config_info",
}  # fmt: skip


def test_metrics_are_vllm_072s(trio):
    """`Metrics.__init__` (vllm/engine/metrics.py): its series and buckets (TTFT up to 10 s,
    TPOT up to 2.5 s, e2e up to 60 s); the module calls `disable_created_metrics()`."""
    baseline = trio[0]
    assert post(baseline, COMPLETIONS, completion_body("measure me", 3)).status_code == 200
    text = scrape(baseline.url)
    families = {f.name for f in text_string_to_metric_families(text) if "vllm:" in f.name}
    assert families == VLLM_072_SERIES
    assert "_created" not in text

    def bounds(name: str) -> list[str]:
        return [s.labels["le"] for s in samples(text) if s.name == f"{name}_bucket"]

    assert bounds("vllm:time_to_first_token_seconds")[-3:] == ["7.5", "10.0", "+Inf"]
    assert bounds("vllm:time_per_output_token_seconds")[-3:] == ["1.0", "2.5", "+Inf"]
    assert bounds("vllm:e2e_request_latency_seconds")[-3:] == ["50.0", "60.0", "+Inf"]


# -- 7: smaller wire differences -----------------------------------------------------------------
@pytest.fixture(scope="module")
def aliased():
    args = ["--host", "127.0.0.1", "--sim-profile", "instant"]
    proc = sim_proc("aliased", [*args, "--served-model-name", "main-name", "alias"])
    with running(proc):
        yield proc


@pytest.mark.parametrize("path", [COMPLETIONS, CHAT])
def test_model_in_responses_is_the_first_served_name(aliased, path):
    """`OpenAIServingModels.model_name` (serving_models.py) returns served_model_name[0]."""
    body = {**(chat_body if path == CHAT else completion_body)("x", 2), "model": "alias"}
    assert post(aliased, path, body).json()["model"] == "main-name"
    chunks, _ = stream(aliased, path, body)
    assert {c["model"] for c in chunks} == {"main-name"}


def test_continuous_usage_is_per_prompt_and_per_choice(trio):
    """`completion_stream_generator` (serving_completion.py) builds each chunk's usage from
    `num_prompt_tokens[prompt_idx]` and `previous_num_tokens[i]`, dumped with exclude_unset=False
    (so `prompt_tokens_details: null`)."""
    opts = {"include_usage": True, "continuous_usage_stats": True}
    body = completion_body(["one two three", "four"], 2, stream_options=opts)
    chunks, _ = stream(trio[0], COMPLETIONS, body)
    prompt_tokens = {0: 4, 1: 2}  # BOS + one per word
    sent = {0: 0, 1: 0}
    for chunk in chunks[:-1]:
        index = chunk["choices"][0]["index"]
        sent[index] += 1
        assert chunk["usage"] == {
            "prompt_tokens": prompt_tokens[index],
            "total_tokens": prompt_tokens[index] + sent[index],
            "completion_tokens": sent[index],
            "prompt_tokens_details": None,
        }
    assert chunks[-1]["usage"] == {"prompt_tokens": 6, "total_tokens": 10, "completion_tokens": 4}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"top_p": 0}, "top_p must be in (0, 1], got 0.0."),
        ({"top_k": 0}, "top_k must be -1 (disable), or at least 1, got 0."),
        ({"stop": [""]}, "stop cannot contain an empty string."),
        ({"stop": ""}, "stop cannot contain an empty string."),
        (
            {"max_tokens": 8189},
            "This model's maximum context length is 8192 tokens. However, you requested 8194 "
            "tokens (5 in the messages, 8189 in the completion). Please reduce the length of the "
            "messages or completion.",
        ),
    ],
)
def test_sampling_and_length_errors_read_as_vllms(trio, change, message):
    """`SamplingParams._verify_args` (vllm/sampling_params.py) runs before greedy sampling
    resets top_p/top_k; `OpenAIServing._validate_input` (serving_engine.py) always says
    "messages"; `create_error_response` leaves `param` null."""
    resp = post(trio[0], COMPLETIONS, {**completion_body("a b c d", 4), **change})
    assert resp.status_code == 400
    assert resp.json() == {
        "object": "error", "message": message, "type": "BadRequestError", "param": None,
        "code": 400,
    }  # fmt: skip


def test_chat_without_max_tokens_and_too_long_a_prompt(trio):
    """`_validate_input`'s other branch (no max_tokens): its message, comma and all."""
    resp = post(
        trio[0], CHAT, {"model": MODEL, "messages": [{"role": "user", "content": "w " * 9000}]}
    )
    assert resp.status_code == 400
    assert resp.json()["message"] == (
        "This model's maximum context length is 8192 tokens. However, you requested 9008 tokens "
        "in the messages, Please reduce the length of the messages."
    )


def test_version_and_unknown_routes(trio):
    """`show_version` (vllm/entrypoints/openai/api_server.py) reports setup.py's
    `get_vllm_version`: the tag plus `+neuron<neuronx-cc>`; unknown routes get FastAPI's JSON."""
    version = httpx.get(trio[0].url + "/version").json()
    assert re.fullmatch(r"\d+\.\d+\.\d+\+neuron\d{3}", version["version"]), version
    for method, path, detail, status in (
        ("GET", "/nope", "Not Found", 404),
        ("GET", "/v1/completions", "Method Not Allowed", 405),
    ):
        resp = httpx.request(method, trio[0].url + path)
        assert (resp.status_code, resp.json()) == (status, {"detail": detail})
