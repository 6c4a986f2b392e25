"""The SSE decoder (`wire/sse.py`): what comes out must not depend on how TCP split the bytes."""

from __future__ import annotations

import itertools
import random

import pytest

from di_router.wire.sse import EventTooLarge, SSEDecoder, encode_event

MAX = 1 << 20


def feed_all(parts: list[bytes], max_event_bytes: int = MAX) -> list[bytes]:
    decoder = SSEDecoder(max_event_bytes)
    return [data for part in parts for data in decoder.feed(part)]


def split_at(stream: bytes, cuts: list[int]) -> list[bytes]:
    bounds = [0, *sorted(cuts), len(stream)]
    return [stream[a:b] for a, b in itertools.pairwise(bounds)]


STREAM_LF = (
    b'data: {"a": 1}\n\n'
    b": keep-alive\n\n"
    b"data: first line\ndata: second line\n\n"
    b"data:no-space\n\n"
    b"event: ignored\ndata: with a field before\n\n"
    b"data: [DONE]\n\n"
)
EXPECTED = [
    b'{"a": 1}',
    b"first line\nsecond line",
    b"no-space",
    b"with a field before",
    b"[DONE]",
]


@pytest.mark.parametrize("crlf", [False, True], ids=["lf", "crlf"])
def test_any_split_gives_the_same_events(crlf: bool) -> None:
    """Seeded property test: 300 random splits (1 to 12 cuts, empty chunks included)."""
    stream = STREAM_LF.replace(b"\n", b"\r\n") if crlf else STREAM_LF
    rng = random.Random(8)
    for _ in range(300):
        cuts = [rng.randint(0, len(stream)) for _ in range(rng.randint(1, 12))]
        assert feed_all(split_at(stream, cuts)) == EXPECTED, cuts


def test_every_single_cut_and_byte_by_byte() -> None:
    stream = STREAM_LF.replace(b"\n", b"\r\n")
    for cut in range(len(stream) + 1):
        assert feed_all(split_at(stream, [cut])) == EXPECTED, cut
    assert feed_all([stream[i : i + 1] for i in range(len(stream))]) == EXPECTED


def test_crlf_split_between_cr_and_lf() -> None:
    """A CR at the end of a chunk may be half of a CRLF: the event ends only with the LF."""
    decoder = SSEDecoder(MAX)
    assert decoder.feed(b"data: x\r\n\r") == []
    assert decoder.feed(b"\n") == [b"x"]
    assert decoder.feed(b"data: y\r") == []
    assert decoder.feed(b"") == []
    assert decoder.feed(b"\n\r\ndata: z\r\n\r\n") == [b"y", b"z"]


def test_comments_and_events_without_data_yield_nothing() -> None:
    assert feed_all([b": ping\n\n", b"event: x\nid: 3\n\n", b":\n\n"]) == []


def test_payload_bytes_pass_untouched() -> None:
    """Payloads are returned byte for byte (the relay forwards them verbatim)."""
    payload = '{"text": "caf\u00e9 \\n \\"q\\"", "n": [1, 2]}'.encode()
    assert feed_all([encode_event(payload)]) == [payload]


def test_event_over_the_cap_raises() -> None:
    decoder = SSEDecoder(1024)
    decoder.feed(b"data: " + b"x" * 1000)
    with pytest.raises(EventTooLarge, match="1024"):
        decoder.feed(b"x" * 100)


def test_the_cap_is_per_event_not_per_stream() -> None:
    """Many events, each under the cap and each split across reads, all pass."""
    event = encode_event(b"x" * 900)
    decoder = SSEDecoder(1024)
    events = [
        data
        for _ in range(50)
        for part in (event[:500], event[500:])
        for data in decoder.feed(part)
    ]
    assert events == [b"x" * 900] * 50


def test_event_over_the_cap_raises_whatever_the_split() -> None:
    """Whether a stream is accepted must not depend on TCP segmentation."""
    stream = encode_event(b"x" * 1500)
    for cut in range(0, len(stream) + 1, 50):
        decoder = SSEDecoder(1024)
        with pytest.raises(EventTooLarge):
            for part in split_at(stream, [cut]):
                decoder.feed(part)


class _CountingBuffer(bytearray):
    """Counts the bytes the decoder searches, to tell a linear scan from a quadratic one."""

    searched = 0

    def find(self, sub: object, start: int = 0, *args: int) -> int:  # type: ignore[override]
        type(self).searched += len(self) - start
        return super().find(sub, start, *args)  # type: ignore[arg-type]


class _CountingDecoder(SSEDecoder):
    def __init__(self, max_event_bytes: int) -> None:
        super().__init__(max_event_bytes)
        self._buffer = _CountingBuffer()


def test_large_event_in_small_chunks_is_scanned_once() -> None:
    """A 20 MB event in 4 KiB reads: each byte is searched about once, not once per read."""
    size = 20 << 20
    stream = encode_event(b"x" * size)
    decoder = _CountingDecoder(32 << 20)
    _CountingBuffer.searched = 0
    step = 4096
    events = [
        data for i in range(0, len(stream), step) for data in decoder.feed(stream[i : i + step])
    ]
    assert events == [b"x" * size]
    assert _CountingBuffer.searched <= 2 * len(stream)


@pytest.mark.parametrize(
    "event",
    [b'data: {"a": 1}\n\n', b"data: \n\n", b"data: a\rb\n\n", b"data: x\n\ndata: y\n\n",
     b"data: " + b"x" * 64 + b"\n\n", b"data: " + b"x" * 65 + b"\n\n", b"data: x\r\n\r\n",
     b"data: a\r\n\n", b"data: a\n\n\ndata: b\n\n", b"data: a\n\n: ping\n\ndata: b\n\n",
     b"data: a\n\ndata: \n\n", b"data: a\n\ndata: b\ndata: c\n\n", b"data: a\ndata: b\n\n"],
    ids=["json", "empty", "lone-cr", "two-events", "at-cap", "over-cap", "crlf", "cr-lf-lf",
         "three-lf", "comment", "empty-second", "two-lines", "one-event-two-lines"],
)  # fmt: skip
def test_a_whole_event_per_read_decodes_as_when_split(event: bytes) -> None:
    """One whole event per read takes a shortcut; it must agree with the general path, also
    after a CR held back from the previous read."""

    def outcome(parts: list[bytes]) -> list[bytes] | str:
        try:
            return feed_all(parts, 70)
        except EventTooLarge:
            return "too large"

    assert outcome([event]) == outcome([event[:1], event[1:]])  # the second read: general
    assert outcome([b"data: held\r", b"\n" + event]) == outcome([b"data: held\r\n", event])
