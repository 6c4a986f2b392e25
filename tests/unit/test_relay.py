"""The token-exact merge (`relay.StreamMerger`) of prefill's first token and decode's stream."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from di_router.router.relay import StreamMerger, parse_chunk
from di_router.router.trace import RequestTrace
from di_router.router.upstream import UpstreamError
from di_router.wire.sse import encode_event
from tests.unit.chunks import (
    CREATED,
    data,
    parsed,
    role_chunk,
    token_chunk,
    usage_chunk,
)

CLIENT_ID = "cmpl-0123abcd"


def client_id(chat: bool) -> str:
    return "chat" + CLIENT_ID if chat else CLIENT_ID


def merger(chat: bool = False, choices: int = 1) -> StreamMerger:
    trace = RequestTrace(router_id=CLIENT_ID, endpoint="chat" if chat else "completions")
    return StreamMerger(trace, client_id(chat), CREATED, chat, choices)


def text_of(chunks: list[dict[str, Any]], chat: bool) -> dict[int, str]:
    out: dict[int, str] = {}
    for chunk in chunks:
        for c in chunk["choices"]:
            piece = c["delta"].get("content", "") if chat else c["text"]
            out[c["index"]] = out.get(c["index"], "") + piece
    return out


def finishes(chunks: list[dict[str, Any]]) -> list[tuple[int, str]]:
    return [
        (c["index"], c["finish_reason"])
        for ch in chunks
        for c in ch["choices"]
        if c["finish_reason"]
    ]


@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
def test_one_prompt_repeated_token_dropped(chat: bool) -> None:
    m = merger(chat)
    rid = client_id(chat)
    prefill = [token_chunk(chat, "upstream-id", 0, "A", "length", created=1)]
    if chat:
        prefill.insert(0, role_chunk("upstream-id", created=1))
    out = b"".join(m.prefill(data(c)) for c in prefill)
    assert m.has_first_tokens
    assert m.prefill(data(usage_chunk(chat, "upstream-id", 7, 1))) == b""  # the prompt size only
    assert m.trace.prompt_tokens == 7
    decode = [token_chunk(chat, rid, 0, "A"), token_chunk(chat, rid, 0, "B")]
    decode.append(token_chunk(chat, rid, 0, "C", "length"))
    if chat:
        decode.insert(0, role_chunk(rid))
    out += b"".join(m.decode(data(c)) for c in decode)
    chunks = parsed(out)
    assert text_of(chunks, chat) == {0: "ABC"}
    assert finishes(chunks) == [(0, "length")]  # prefill's "length" (max_tokens=1) is cleared
    assert {c["id"] for c in chunks} == {rid}
    assert {c["created"] for c in chunks} == {CREATED}
    if chat:  # prefill's role chunk, first; decode's dropped
        roles = [c for c in chunks if "role" in c["choices"][0]["delta"]]
        assert roles == [chunks[0]]
        assert all("stop_reason" not in c for ch in chunks[:2] for c in ch["choices"])
    else:
        assert chunks[0]["choices"][0]["stop_reason"] is None
    assert m.trace.completion_tokens == 3


def test_prompt_list_with_interleaved_indices() -> None:
    """Three prompts: prefill's first tokens arrive out of order, decode interleaves the indices
    and repeats each first token once, sometimes in a chunk that also carries other indices."""
    m = merger(choices=3)
    for index in (1, 0):
        m.prefill(data(token_chunk(False, "x", index, f"{index}a", "length")))
        assert not m.has_first_tokens
    m.prefill(data(token_chunk(False, "x", 2, "2a", "length")))
    assert m.has_first_tokens
    both = token_chunk(False, CLIENT_ID, 0, "0b")
    both["choices"].append({**token_chunk(False, CLIENT_ID, 1, "1a")["choices"][0]})
    decode = [
        token_chunk(False, CLIENT_ID, 2, "2a"),
        token_chunk(False, CLIENT_ID, 0, "0a"),
        both,  # index 0's second token and index 1's repeat, together
        token_chunk(False, CLIENT_ID, 2, "2b", "stop"),
        token_chunk(False, CLIENT_ID, 1, "1b", "length"),
        token_chunk(False, CLIENT_ID, 0, "0c", "length"),
    ]
    chunks = parsed(b"".join(m.decode(data(c)) for c in decode))
    assert text_of(chunks, False) == {0: "0b0c", 1: "1b", 2: "2b"}
    assert sorted(finishes(chunks)) == [(0, "length"), (1, "length"), (2, "stop")]
    assert m.trace.completion_tokens == 3 + 4


@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
def test_finish_reason_on_the_repeated_chunk_is_kept_blanked(chat: bool) -> None:
    """max_tokens=1: decode's only chunk is the repeat, with the real finish_reason."""
    m = merger(chat)
    m.prefill(data(token_chunk(chat, "x", 0, "A", "length")))
    repeat = token_chunk(chat, client_id(chat), 0, "A", "stop")
    repeat["choices"][0]["logprobs"] = {"tokens": ["A"]}
    (chunk,) = parsed(m.decode(data(repeat)))
    (choice,) = chunk["choices"]
    assert choice["finish_reason"] == "stop"
    assert choice["logprobs"] is None
    assert (choice["delta"] == {"content": ""}) if chat else (choice["text"] == "")
    assert m.trace.completion_tokens == 1  # prefill's token only


@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
def test_decode_usage_chunk_reaches_the_client(chat: bool) -> None:
    m = merger(chat)
    m.prefill(data(token_chunk(chat, "x", 0, "A", "length")))
    m.decode(data(token_chunk(chat, client_id(chat), 0, "A")))
    usage = usage_chunk(chat, client_id(chat), 5, 2)
    out = m.decode(data(usage))
    assert out == encode_event(data(usage))
    assert m.trace.prompt_tokens == 5


def test_verbatim_when_id_and_created_match() -> None:
    """Decode's bytes are relayed as sent (its own spacing kept) when nothing must change."""
    m = merger()
    m.prefill(data(token_chunk(False, "x", 0, "A", "length")))
    m.decode(data(token_chunk(False, CLIENT_ID, 0, "A")))
    raw = orjson.dumps(token_chunk(False, CLIENT_ID, 0, "B"), option=orjson.OPT_INDENT_2)
    raw = raw.replace(b"\n", b" ")  # valid JSON that orjson would never write
    assert m.decode(raw) == encode_event(raw)


@pytest.mark.parametrize(
    "change", [{"created": CREATED + 1}, {"id": "cmpl-other"}], ids=["created", "id"]
)
def test_rewritten_when_id_or_created_differ(change: dict[str, Any]) -> None:
    m = merger()
    m.prefill(data(token_chunk(False, "x", 0, "A", "length")))
    for text in ("A", "B", "C"):
        sent = {**token_chunk(False, CLIENT_ID, 0, text), **change}
        out = m.decode(data(sent))
        if text == "A":
            assert out == b""
            continue
        (chunk,) = parsed(out)
        assert (chunk["id"], chunk["created"]) == (CLIENT_ID, CREATED)
        assert chunk["choices"] == sent["choices"]


ERROR = {"object": "error", "message": "boom", "type": "BadRequestError", "param": None}


@pytest.mark.parametrize("role", ["prefill", "decode"])
@pytest.mark.parametrize(
    ("raw", "status", "error_type"),
    [
        (orjson.dumps({"error": {**ERROR, "code": 400}}), 400, "stream_error"),
        (orjson.dumps({"error": {**ERROR, "code": "nope"}}), 502, "stream_error"),
        (orjson.dumps({"error": "plain words"}), 502, "stream_error"),
        (b'{"choices": [1]}', 502, "bad_response"),
        (b'{"id": "x"}', 502, "bad_response"),
        (b"not json", 502, "bad_response"),
        (b"[1, 2]", 502, "bad_response"),
    ],
    ids=["error-400", "error-bad-code", "error-string", "choice-int", "no-choices", "text", "list"],
)
def test_errors_and_malformed_events_raise(
    role: str, raw: bytes, status: int, error_type: str
) -> None:
    m = merger()
    if role == "decode":
        m.prefill(data(token_chunk(False, "x", 0, "A", "length")))
    with pytest.raises(UpstreamError) as info:
        m.prefill(raw) if role == "prefill" else m.decode(raw)
    error = info.value
    assert (error.role, error.status, error.error_type) == (role, status, error_type)
    assert error.message
    if raw.startswith(b'{"error": {'):
        assert error.message == "boom"
    elif error_type == "bad_response":
        assert role in error.message


def test_parse_chunk_returns_the_chunk() -> None:
    chunk = token_chunk(True, "x", 0, "A")
    assert parse_chunk("decode", data(chunk)) == chunk
