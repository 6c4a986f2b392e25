"""Deterministic generation and vLLM's stop rules: max/min tokens, stop strings and ids, EOS."""

from __future__ import annotations

import pytest

from di_router.sim.tokenizer import VOCAB
from tests.eos_prompts import eos_first_prompt
from tests.sim.conftest import (
    CHAT,
    COMPLETIONS,
    chat_body,
    completion_body,
    post,
    sim_proc,
    stream,
    texts,
)
from tests.support import running

GREEDY = {"temperature": 0}
EOS_P = 0.5


def test_greedy_is_a_function_of_the_prompt(trio):
    baseline = trio[0]
    a1 = texts(post(baseline, COMPLETIONS, completion_body("a tornado is a", 10)))
    a2 = texts(post(baseline, COMPLETIONS, completion_body("a tornado is a", 10)))
    b = texts(post(baseline, COMPLETIONS, completion_body("a hurricane is a", 10)))
    assert a1 == a2 and a1 != b
    # A shorter request is a prefix of a longer one (nothing depends on max_tokens).
    short = texts(post(baseline, COMPLETIONS, completion_body("a tornado is a", 3)))[0]
    assert a1[0].startswith(short) and len(short.split()) == 3
    # A greedy request ignores its seed.
    seeded = texts(post(baseline, COMPLETIONS, completion_body("a tornado is a", 10, seed=3)))
    assert seeded == a1


def test_seeded_sampling_is_deterministic_and_unseeded_is_not(trio):
    baseline = trio[0]

    def sample(**extra):
        body = completion_body("roll the dice", 16, temperature=0.8, **extra)
        return texts(post(baseline, COMPLETIONS, body))[0]

    assert sample(seed=7) == sample(seed=7)
    assert sample(seed=7) != sample(seed=8)
    greedy = texts(post(baseline, COMPLETIONS, completion_body("roll the dice", 16)))[0]
    assert sample(seed=7) != greedy
    assert sample() != sample()  # 16 random words out of 512 twice alike: never


def test_chat_max_completion_tokens_wins_over_max_tokens(trio):
    body = chat_body("hi", 10, max_completion_tokens=3)
    resp = post(trio[0], CHAT, body).json()
    assert resp["usage"]["completion_tokens"] == 3
    assert resp["choices"][0]["finish_reason"] == "length"
    assert post(trio[0], CHAT, chat_body("hi", 10)).json()["usage"]["completion_tokens"] == 10


def test_chat_default_max_tokens_fills_the_context(trio):
    # No max_tokens: vLLM 0.7.2 uses max_model_len - prompt.
    body = chat_body("hi", 1)
    del body["max_tokens"]
    resp = post(trio[0], CHAT, body)
    assert resp.status_code == 200, resp.text
    assert resp.json()["usage"]["completion_tokens"] == 8183  # 8192 - 9 prompt tokens


def test_completion_default_max_tokens_is_16(trio):
    body = completion_body("x", 1)
    del body["max_tokens"]
    assert post(trio[0], COMPLETIONS, body).json()["usage"]["completion_tokens"] == 16


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_truncates(trio, include):
    baseline = trio[0]
    full = texts(post(baseline, COMPLETIONS, completion_body("stop here", 12)))[0]
    stop = " " + full.split()[5]
    cut = full.find(stop)
    expected = full[: cut + len(stop)] if include else full[:cut]
    body = completion_body("stop here", 12, stop=[stop], include_stop_str_in_output=include)
    choice = post(baseline, COMPLETIONS, body).json()["choices"][0]
    assert (choice["text"], choice["finish_reason"], choice["stop_reason"]) == (
        expected, "stop", stop
    )  # fmt: skip
    _, streamed = stream(baseline, COMPLETIONS, body)
    assert streamed["text"][0] == expected and streamed["finish"][0] == "stop"


@pytest.mark.parametrize("include", [False, True])
def test_stop_token_ids(trio, include):
    """vLLM's StopChecker removes a stop token's text unless include_stop_str_in_output."""
    baseline = trio[0]
    words = texts(post(baseline, COMPLETIONS, completion_body("stop token", 12)))[0].split()
    k = next(i for i, w in enumerate(words) if w not in words[:i] and i >= 3)
    token_id = VOCAB.index(words[k])
    body = completion_body(
        "stop token", 12, stop_token_ids=[token_id], include_stop_str_in_output=include
    )
    resp = post(baseline, COMPLETIONS, body).json()
    choice = resp["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["stop_reason"] == token_id
    assert resp["usage"]["completion_tokens"] == k + 1
    kept = words[: k + 1] if include else words[:k]
    assert choice["text"] == "".join(" " + w for w in kept)
    _, streamed = stream(baseline, COMPLETIONS, body)
    assert streamed["text"][0] == choice["text"]


# -- EOS -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def eos_server():
    proc = sim_proc(
        "eos",
        ["--host", "127.0.0.1", "--sim-profile", "instant", "--sim-eos-probability", str(EOS_P)],
    )
    with running(proc):
        yield proc


def test_eos_as_the_very_first_token(eos_server):
    prompt = eos_first_prompt(False, GREEDY, EOS_P)
    resp = post(eos_server, COMPLETIONS, completion_body(prompt, 8)).json()
    choice = resp["choices"][0]
    assert (choice["text"], choice["finish_reason"], choice["stop_reason"]) == ("", "stop", None)
    assert resp["usage"]["completion_tokens"] == 1
    chunks, result = stream(eos_server, COMPLETIONS, completion_body(prompt, 8))
    assert len(chunks) == 1 and result == {"text": {0: ""}, "finish": {0: "stop"}, "usage": None}


def test_eos_first_chat_stream_still_sends_role_chunk(eos_server):
    content = eos_first_prompt(True, GREEDY, EOS_P)
    chunks, result = stream(eos_server, CHAT, chat_body(content, 8))
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[1]["choices"][0]["delta"] == {"content": ""}
    assert chunks[1]["choices"][0]["finish_reason"] == "stop"
    assert result["finish"] == {0: "stop"} and len(chunks) == 2


def test_eos_ends_requests_early(eos_server):
    resps = [
        post(eos_server, COMPLETIONS, completion_body(f"early {i}", 8)).json() for i in range(12)
    ]
    stopped = [r for r in resps if r["choices"][0]["finish_reason"] == "stop"]
    assert len(stopped) >= 10  # P(length) = 0.5**8 per request
    for r in stopped:  # EOS counts as a token but has no text
        assert len(r["choices"][0]["text"].split()) == r["usage"]["completion_tokens"] - 1


def test_min_tokens_and_ignore_eos_override_eos(eos_server):
    prompt = eos_first_prompt(False, GREEDY, EOS_P)
    body = completion_body(prompt, 8, min_tokens=3)
    resp = post(eos_server, COMPLETIONS, body).json()
    assert resp["usage"]["completion_tokens"] >= 4  # no EOS among the first 3; the 4th may be
    resp = post(eos_server, COMPLETIONS, completion_body(prompt, 8, ignore_eos=True)).json()
    assert resp["usage"]["completion_tokens"] == 8
    assert resp["choices"][0]["finish_reason"] == "length"
    assert len(resp["choices"][0]["text"].split()) == 8
