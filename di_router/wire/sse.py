"""Server-sent-events framing exactly as vLLM writes it: `data: <json>\\n\\n`, then `[DONE]`."""

from __future__ import annotations

from collections.abc import Iterator

DONE_EVENT = b"data: [DONE]\n\n"
DONE_DATA = b"[DONE]"
SSE_CONTENT_TYPE = "text/event-stream; charset=utf-8"


def encode_event(data: bytes) -> bytes:
    return b"data: " + data + b"\n\n"


class SSEDecoder:
    """Incremental decoder of an upstream SSE byte stream into `data` payloads.

    Works on whole events (split at blank lines), never on lines alone, so a payload of any size
    or a chunk boundary anywhere is handled; comment lines (`: keep-alive`) are skipped.
    """

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, chunk: bytes) -> Iterator[bytes]:
        self._buffer += chunk.replace(b"\r\n", b"\n") if b"\r" in chunk else chunk
        while True:
            end = self._buffer.find(b"\n\n")
            if end < 0:
                return
            event, self._buffer = self._buffer[:end], self._buffer[end + 2 :]
            data = [
                line[5:].removeprefix(b" ")
                for line in event.split(b"\n")
                if line.startswith(b"data:")
            ]
            if data:
                yield b"\n".join(data)
