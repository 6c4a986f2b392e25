"""Server-sent-events framing exactly as vLLM writes it: `data: <json>\\n\\n`, then `[DONE]`."""

from __future__ import annotations

DONE_EVENT = b"data: [DONE]\n\n"
DONE_DATA = b"[DONE]"
SSE_CONTENT_TYPE = "text/event-stream; charset=utf-8"
_FIELDS = (b"data:", b"event:", b"id:", b"retry:", b":", b"data", b"event", b"id", b"retry")
"""What an SSE line may start with (a field name alone is a field with an empty value)."""


def encode_event(data: bytes) -> bytes:
    return b"data: " + data + b"\n\n"


class EventTooLarge(ValueError):
    """An upstream event grew past the decoder's cap: a broken or hostile backend."""


class MalformedEvent(ValueError):
    """An event with a line that is no SSE field at all: vLLM never sends one, so the backend
    is broken (skipping it, as a browser would, could silently lose a token)."""


class SSEDecoder:
    """Incremental decoder of an SSE byte stream into `data` payloads.

    Linear in the bytes fed: the buffer is scanned only from where the last scan stopped, so a
    large event arriving in many small reads costs no more than the same event in one read.
    An event larger than `max_event_bytes` raises `EventTooLarge` instead of growing forever.
    Works on whole events (split at blank lines, LF or CRLF), so a payload of any size or a
    chunk boundary anywhere is handled; comment lines (`: keep-alive`) are skipped.
    """

    def __init__(self, max_event_bytes: int) -> None:
        self._buffer = bytearray()
        self._scanned = 0
        self._max = max_event_bytes
        self._held_cr = False

    def feed(self, chunk: bytes) -> list[bytes]:
        if not self._buffer and not self._held_cr and chunk.endswith(b"\n\n"):
            whole = self._whole_events(chunk)
            if whole is not None:
                return whole
        if self._held_cr or b"\r" in chunk:
            chunk = self._lf_only(chunk)
        buffer = self._buffer
        buffer += chunk
        events: list[bytes] = []
        start = 0
        search = max(self._scanned - 1, 0)
        while (end := buffer.find(b"\n\n", search)) >= 0:
            if end - start > self._max:
                raise EventTooLarge(f"an event is larger than {self._max} bytes")
            if data := _data_of(bytes(buffer[start:end])):
                events.append(data)
            start = search = end + 2
        if start:
            del buffer[:start]
        self._scanned = len(buffer)
        if self._scanned > self._max:
            raise EventTooLarge(f"an event is larger than {self._max} bytes")
        return events

    def _whole_events(self, chunk: bytes) -> list[bytes] | None:
        """The common read, one or more whole one-line `data:` events, without the buffer;
        None when anything else is in it (the general path then decides)."""
        if b"\r" in chunk:
            return None
        events = chunk[:-2].split(b"\n\n")
        for event in events:
            if not 6 < len(event) <= self._max or not event.startswith(b"data: "):
                return None
            if b"\n" in event:
                return None
        return [event[6:] for event in events]

    def _lf_only(self, chunk: bytes) -> bytes:
        """CRLF to LF, in this chunk only; a CR at its end waits for the next (it may be CRLF)."""
        if self._held_cr:
            chunk = b"\r" + chunk
        self._held_cr = chunk.endswith(b"\r")
        if self._held_cr:
            chunk = chunk[:-1]
        return chunk.replace(b"\r\n", b"\n")


def _data_of(event: bytes) -> bytes:
    """The event's `data` payload (lines joined by LF); b"" for a comment-only event."""
    if event.startswith(b"data: ") and b"\n" not in event:
        return event[6:]  # the common case: one `data:` line
    lines = event.split(b"\n")
    if any(line and not line.startswith(_FIELDS) for line in lines):
        raise MalformedEvent(f"an event that is not SSE: {event[:80]!r}")
    return b"\n".join(line[5:].removeprefix(b" ") for line in lines if line.startswith(b"data:"))
