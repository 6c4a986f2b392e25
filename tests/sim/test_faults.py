"""Fault injection (`--sim-fault-*`): what a client sees over a real socket, that the seed makes
it reproducible, and that no simulator slot stays in use after a fault cut or stalled a stream."""

from __future__ import annotations

import concurrent.futures
import itertools
import time
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest

from di_router.sim.args import parse_settings
from di_router.sim.faults import CRASH_EXIT_CODE
from tests.sim.conftest import (
    CHAT,
    COMPLETIONS,
    chat_body,
    completion_body,
    metrics,
    post,
    timed_events,
)
from tests.sse_strict import assemble, check_chunks, parse_sse
from tests.support import Proc, running, sim_stats, start_sim, wait_until

SLOW = ["--sim-decode-base-ms", "5"]  # 5 ms a token: a cut lands while the engine still decodes
HALF = ["--sim-fault-rate", "0.5"]
LOCATION = "http://127.0.0.1:9/v1/completions"
SIMS: dict[str, list[str]] = {
    "503_seed7": ["--sim-fault-status", "503", *HALF, "--sim-fault-seed", "7"],
    "503_seed8": ["--sim-fault-status", "503", *HALF, "--sim-fault-seed", "8"],
    "502_or_drop_seed7": [
        *("--sim-fault-status", "502", "--sim-fault-drop", *HALF, "--sim-fault-seed", "7")
    ],
    "204": ["--sim-fault-status", "204"],
    "302": ["--sim-fault-status", "302"],
    "302_location": ["--sim-fault-status", "302", "--sim-fault-location", LOCATION],
    "520": ["--sim-fault-status", "520"],
    "drop": ["--sim-fault-drop", "--sim-fault-after", "3", *SLOW],
    "stall_headers": ["--sim-fault-stall-headers", "0.4"],
    "stall_headers_forever": ["--sim-fault-stall-headers", "inf"],
    "stall": ["--sim-fault-stall", "0.4", "--sim-fault-after", "2"],
    "stall_forever": ["--sim-fault-stall", "inf", "--sim-fault-after", "2", *SLOW],
    "trickle": ["--sim-fault-trickle", "7", "--sim-fault-trickle-delay", "0.002"],
    "malformed_sse": ["--sim-fault-malformed", "sse"],
    "malformed_json": ["--sim-fault-malformed", "json", "--sim-fault-after", "0"],
    "oversized": ["--sim-fault-oversized", "100000"],
    "crash": ["--sim-fault-crash", "--sim-fault-after", "2"],
    "crash_after_requests": ["--sim-fault-crash-after-requests", "2"],
    "mixed": [
        *("--sim-fault-status", "503", "--sim-fault-drop", "--sim-fault-stall-headers", "0.2"),
        *("--sim-fault-stall", "0.2", "--sim-fault-trickle", "64", "--sim-fault-malformed", "json"),
        *("--sim-fault-oversized", "5000", "--sim-fault-rate", "0.8", "--sim-fault-seed", "3"),
    ],
}


@pytest.fixture(scope="module")
def sims() -> Iterator[dict[str, Proc]]:
    """One baseline simulator per fault setting, all booting at once."""
    procs = {name: start_sim("baseline", extra=extra, name=name) for name, extra in SIMS.items()}
    with running(*procs.values()):
        yield procs
        for proc in procs.values():  # all stop at once; running() then only waits for each
            proc.popen.terminate()


def read_stream(
    proc: Proc, path: str, body: dict[str, Any]
) -> tuple[httpx.Response, bytes, Exception | None]:
    """(response, bytes received, the error that ended the read early if any) of one stream."""
    raw = b""
    with (
        httpx.Client(timeout=10) as client,
        client.stream("POST", proc.url + path, json={**body, "stream": True}) as resp,
    ):
        try:
            for data in resp.iter_raw():
                raw += data
        except (httpx.RemoteProtocolError, httpx.ReadError) as exc:  # closed, or reset
            return resp, raw, exc
    return resp, raw, None


def events(raw: bytes) -> list[bytes]:
    """The complete SSE events of a body, without their blank-line terminators."""
    return raw.split(b"\n\n")[:-1]


def injected(proc: Proc) -> dict[str, int]:
    return sim_stats(proc)["faults"]["injected"]


def no_slot_in_use(proc: Proc) -> dict[str, Any]:
    """Bounded poll until every slot is free; the final stats."""
    return wait_until(
        lambda: (s := sim_stats(proc))["slots_in_use"] == 0 and s, 3, f"{proc.name}: slots freed"
    )


def wait_exit(proc: Proc) -> int:
    return wait_until(lambda: proc.popen.poll() is not None, 5, f"{proc.name} to exit") and int(
        proc.popen.returncode
    )


# -- which requests are faulted ------------------------------------------------------------------
def test_the_seed_fixes_which_requests_are_faulted_whatever_the_faults(sims):
    """Same seed and rate: the same requests are faulted, even with other kinds of fault."""

    def status_pattern(proc: Proc) -> list[bool]:
        return [
            post(proc, COMPLETIONS, completion_body("one two three", 2)).status_code == 503
            for _ in range(12)
        ]

    def faulted(resp: httpx.Response, error: Exception | None) -> bool:
        return resp.status_code == 502 or error is not None

    seed7, seed8 = status_pattern(sims["503_seed7"]), status_pattern(sims["503_seed8"])
    two_kinds = sims["502_or_drop_seed7"]
    reads = [read_stream(two_kinds, COMPLETIONS, completion_body("one two", 3)) for _ in range(12)]
    assert True in seed7 and False in seed7
    assert [faulted(resp, error) for resp, _, error in reads] == seed7
    assert seed8 != seed7
    counts = injected(two_kinds)
    assert counts["status"] and counts["drop"]
    assert counts["status"] + counts["drop"] == sum(seed7)


def test_status_fault_answers_an_openai_error_and_the_engine_never_sees_it(sims):
    proc = sims["503_seed7"]
    before = sim_stats(proc)["faults"]
    answers = [post(proc, COMPLETIONS, completion_body("one two three", 2)) for _ in range(8)]
    failed = [r for r in answers if r.status_code == 503]
    assert failed and len(failed) < len(answers)
    assert {r.status_code for r in answers} == {200, 503}
    body = failed[0].json()
    assert body["object"] == "error" and body["code"] == 503
    assert body["type"] == "ServiceUnavailableError"
    assert failed[0].headers["content-type"] == "application/json"
    stats = no_slot_in_use(proc)
    assert stats["faults"]["requests"] == before["requests"] + 8
    assert stats["faults"]["injected"]["status"] == before["injected"]["status"] + len(failed)
    # Only the answered requests reached the engine: 4 prompt tokens (BOS + 3 words) each.
    answered = before["requests"] - before["injected"]["status"] + len(answers) - len(failed)
    assert metrics(proc)["vllm:prompt_tokens_total"] == 4 * answered


@pytest.mark.parametrize(
    ("name", "status", "location"),
    [("204", 204, None), ("302", 302, None), ("302_location", 302, LOCATION), ("520", 520, None)],
)
def test_odd_statuses(sims, name, status, location):
    proc = sims[name]
    for stream in (False, True):
        resp = post(proc, CHAT, chat_body("hello", 5, stream=stream))
        assert resp.status_code == status
        if status == 520:
            assert resp.json()["code"] == 520 and resp.json()["object"] == "error"
        else:
            assert resp.content == b""
        assert resp.headers.get("location") == location
    assert injected(proc) == {"status": 2}
    assert metrics(proc)["vllm:prompt_tokens_total"] == 0


def test_other_routes_are_never_faulted_and_the_log_names_the_fault(sims):
    proc = sims["520"]
    before = sim_stats(proc)["faults"]
    for path in ("/health", "/ping", "/metrics", "/version", "/v1/models", "/sim/stats"):
        assert httpx.get(proc.url + path, timeout=5).status_code == 200, path
    assert httpx.get(proc.url + COMPLETIONS, timeout=5).status_code == 405  # not a POST
    assert sim_stats(proc)["faults"] == before
    assert "fault injection on: status 520 at rate 1 (seed 0)" in proc.log()


# -- cut, stalled and slow responses -------------------------------------------------------------
def test_drop_closes_the_connection_after_n_events_and_the_engine_sees_a_disconnect(sims):
    proc = sims["drop"]
    started = time.monotonic()
    resp, raw, error = read_stream(proc, COMPLETIONS, completion_body("one two", 1000))
    assert resp.status_code == 200
    assert isinstance(error, httpx.RemoteProtocolError)
    assert time.monotonic() - started < 2.5  # cut at once, not after the 5 s of decoding
    assert raw.endswith(b"\n\n") and len(events(raw)) == 3
    assert all(e.startswith(b"data: {") for e in events(raw))
    stats = no_slot_in_use(proc)
    assert stats["aborted"] == 1  # counted as a client disconnect, as a real one is
    # A non-streamed answer is one event: a drop after 3 events never happens.
    assert len(post(proc, COMPLETIONS, completion_body("one two", 3)).json()["choices"]) == 1
    assert injected(proc) == {"drop": 1}


def test_stall_before_headers_delays_the_whole_answer(sims):
    proc = sims["stall_headers"]
    started = time.monotonic()
    resp, raw, error = read_stream(proc, COMPLETIONS, completion_body("one two", 3))
    assert time.monotonic() - started >= 0.4
    assert error is None and resp.status_code == 200
    check_chunks(chunks := parse_sse(raw), chat=False)
    assert assemble(chunks, chat=False)["finish"] == {0: "length"}
    no_slot_in_use(proc)
    assert injected(proc) == {"stall_headers": 1}


def test_stall_before_headers_forever_ends_when_the_client_leaves(sims):
    proc = sims["stall_headers_forever"]
    body = completion_body("one two", 3, stream=True)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(proc.url + COMPLETIONS, json=body, timeout=httpx.Timeout(5, read=0.3))
    stats = no_slot_in_use(proc)
    assert stats["faults"]["injected"] == {"stall_headers": 1}
    assert metrics(proc)["vllm:prompt_tokens_total"] == 0  # held before the engine saw it


def test_stall_mid_stream_pauses_after_n_events_then_completes(sims):
    proc = sims["stall"]
    _, arrivals, raw = timed_events(proc, CHAT, chat_body("one two", 4))
    check_chunks(chunks := parse_sse(raw), chat=True)
    assert assemble(chunks, chat=True)["finish"] == {0: "length"}
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    assert gaps[1] >= 0.4  # between event 2 and event 3
    no_slot_in_use(proc)
    assert injected(proc) == {"stall": 1}


def test_stall_mid_stream_forever_frees_the_slot_when_the_client_leaves(sims):
    proc = sims["stall_forever"]
    body = completion_body("one two", 1000, stream=True)  # 5 s of decoding
    raw = b""
    with (
        httpx.Client(timeout=httpx.Timeout(5, read=0.5)) as client,
        client.stream("POST", proc.url + COMPLETIONS, json=body) as resp,
        pytest.raises(httpx.ReadTimeout),
    ):
        for data in resp.iter_raw():
            raw += data
    assert len(events(raw)) == 2
    stats = no_slot_in_use(proc)  # 3 s bound: well before the 5 s of decoding end
    assert stats["aborted"] == 1  # the engine saw a client disconnect
    assert stats["faults"]["injected"] == {"stall": 1}


def test_trickle_sends_the_body_a_few_bytes_at_a_time(sims):
    proc = sims["trickle"]
    started = time.monotonic()
    resp, raw, error = read_stream(proc, COMPLETIONS, completion_body("one two", 3))
    elapsed = time.monotonic() - started
    assert error is None and resp.status_code == 200
    check_chunks(chunks := parse_sse(raw), chat=False)
    assert assemble(chunks, chat=False)["finish"] == {0: "length"}
    assert elapsed >= (len(raw) // 7 - 1) * 0.002  # one pause between 7-byte pieces
    no_slot_in_use(proc)
    assert injected(proc) == {"trickle": 1}


# -- broken events -------------------------------------------------------------------------------
def test_malformed_sse_sends_an_event_without_its_data_framing(sims):
    proc = sims["malformed_sse"]
    resp, raw, error = read_stream(proc, COMPLETIONS, completion_body("one two", 3))
    assert error is None and resp.status_code == 200
    got = events(raw)
    assert got[0].startswith(b"data: {") and got[-1] == b"data: [DONE]"
    assert not got[1].startswith(b"data:")
    assert orjson.loads(got[1])["choices"][0]["text"]  # the chunk itself, unframed
    assert all(e.startswith(b"data: ") for e in got[2:])
    # A non-streamed answer has no framing to break.
    assert post(proc, COMPLETIONS, completion_body("one two", 3)).json()["choices"]
    no_slot_in_use(proc)
    assert injected(proc) == {"malformed": 1}


def test_malformed_json_cuts_an_event_short(sims):
    proc = sims["malformed_json"]
    resp, raw, error = read_stream(proc, CHAT, chat_body("one two", 3))
    assert error is None and resp.status_code == 200
    first, *rest = events(raw)
    assert first.startswith(b"data: {")
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(first[6:])
    assert [orjson.loads(e[6:])["object"] for e in rest[:-1]] == ["chat.completion.chunk"] * 3
    answer = post(proc, CHAT, chat_body("one two", 3))
    assert answer.status_code == 200 and "content-length" not in answer.headers
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(answer.content)
    no_slot_in_use(proc)
    assert injected(proc) == {"malformed": 2}


def test_oversized_event_is_padded_to_the_size_and_still_valid(sims):
    proc = sims["oversized"]
    resp, raw, error = read_stream(proc, COMPLETIONS, completion_body("one two", 3))
    assert error is None and resp.status_code == 200
    assert [len(e) for e in events(raw)][1] == len(b"data: ") + 100_000
    check_chunks(chunks := parse_sse(raw), chat=False)
    assert assemble(chunks, chat=False)["finish"] == {0: "length"}
    no_slot_in_use(proc)
    assert injected(proc) == {"oversized": 1}


# -- crashes -------------------------------------------------------------------------------------
def test_crash_in_place_of_an_event(sims):
    proc = sims["crash"]
    resp, raw, error = read_stream(proc, COMPLETIONS, completion_body("one two", 10))
    assert resp.status_code == 200 and error is not None
    assert len(events(raw)) == 2
    assert wait_exit(proc) == CRASH_EXIT_CODE
    assert "crashing the process (in place of event 3 of a response)" in proc.log()


def test_crash_after_n_requests(sims):
    proc = sims["crash_after_requests"]
    for _ in range(2):
        assert post(proc, COMPLETIONS, completion_body("one", 2)).status_code == 200
    with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):  # closed, or reset
        post(proc, COMPLETIONS, completion_body("one", 2))
    assert wait_exit(proc) == CRASH_EXIT_CODE
    assert "crashing the process (generation request 3 arrived)" in proc.log()


# -- several faults at once, concurrently ---------------------------------------------------------
def test_mixed_faults_under_concurrency_leave_no_slot_in_use(sims):
    proc = sims["mixed"]
    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        reads = list(
            pool.map(
                lambda i: read_stream(proc, COMPLETIONS, completion_body(f"prompt {i}", 8)),
                range(40),
            )
        )
    statuses = [resp.status_code for resp, _, _ in reads]
    assert set(statuses) == {200, 503}
    stats = no_slot_in_use(proc)
    faults = stats["faults"]
    assert faults["requests"] == 40
    # The draws do not depend on arrival order, so seed 3 gives every kind at least once.
    assert all(faults["injected"].values()), faults["injected"]
    assert faults["injected"]["status"] == statuses.count(503)
    assert faults["injected"]["drop"] == sum(error is not None for _, _, error in reads)
    assert 20 <= sum(faults["injected"].values()) <= 40
    assert "status 503, drop the connection after 1 events, stall 0.2s before" in proc.log()


# -- flags ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--sim-fault-rate", "1.5"], "--sim-fault-rate"),
        (["--sim-fault-status", "99"], "--sim-fault-status"),
        (["--sim-fault-location", "http://x/"], "--sim-fault-location"),
        (["--sim-fault-status", "503", "--sim-fault-location", "/x"], "--sim-fault-location"),
        (["--sim-fault-after", "-1", "--sim-fault-drop"], "--sim-fault-after"),
        (["--sim-fault-stall", "-1"], "--sim-fault-stall"),
        (["--sim-fault-stall-headers", "nan"], "--sim-fault-stall-headers"),
        (["--sim-fault-trickle", "0"], "--sim-fault-trickle"),
        (["--sim-fault-oversized", "0"], "--sim-fault-oversized"),
        (["--sim-fault-malformed", "xml"], "--sim-fault-malformed"),
    ],
)
def test_bad_fault_flags_are_clear_errors(argv, named, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_settings(argv)
    assert exit_info.value.code != 0
    assert named in capsys.readouterr().err
