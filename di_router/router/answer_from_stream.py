"""A non-streamed answer rebuilt from decode's stream, exactly as vLLM 0.7.2 would have sent it.

On Neuron the router reads decode as a stream even when its client asked for one JSON body:
vLLM sends a non-streamed answer's headers only with the whole answer, so without a stream the
router could not tell a decode still waiting for KV (or never admitted) from one running a long
answer, and after a failure it would have to guess whether a slot may be held (`neuron.py`).
A stream says both: its headers mean the request reached the engine, its first event that the
KV wait is over.

The body is vLLM 0.7.2's `CompletionResponse` / `ChatCompletionResponse` (`model_dump()`, so
every field, nulls included, in their order): choices in index order with their text
concatenated and the last chunk's `finish_reason` and `stop_reason`; usage from the stream's
usage chunk (which has no `prompt_tokens_details`), asked for with `stream_options`. Requests
whose streamed form is not a plain concatenation (logprobs, tool calls) keep a non-streamed
decode (`streamable`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from di_router.router.relay import parse_chunk
from di_router.wire.vllm_bodies import ResponseHead
from di_router.wire.vllm_bodies import usage as vllm_usage

STREAMED_DECODE_OPTIONS = {"include_usage": True}


def streamable(body: dict[str, Any], chat: bool) -> bool:
    """Whether this non-streamed request's answer can be rebuilt exactly from its stream.

    Not when it asks for logprobs (a completions stream restarts `text_offset` per chunk from
    the text length, not the token lengths), for tools (vLLM parses tool calls differently in
    the two modes), for a completions `echo` (vLLM 0.7.2's stream then fails an assertion on
    the prompt logprobs it did not compute), or sets `stream_options` (which vLLM refuses
    without `stream`: decode's 400 must reach the client as it would directly).
    """
    if "stream_options" in body or (not chat and body.get("echo")):
        return False
    logprobs = body.get("logprobs")  # an int for completions (0 too), a bool for chat
    if (logprobs is not None and logprobs is not False) or body.get("top_logprobs") is not None:
        return False
    return not (chat and (body.get("tools") or body.get("tool_choice") not in (None, "none")))


@dataclass
class _Choice:
    text: list[str] = field(default_factory=list)
    reasoning: list[str] | None = None
    role: str = "assistant"
    finish_reason: str | None = None
    stop_reason: str | int | None = None


class AnswerFromStream:
    """Feed it decode's `data` payloads in order; `body()` is the answer."""

    def __init__(self, chat: bool) -> None:
        self._chat = chat
        self._choices: dict[int, _Choice] = {}
        self._model = ""
        self._tokens = 0
        self.usage: dict[str, Any] | None = None
        self.size = 0
        """Characters of text held: what the answer will weigh, whatever the stream's framing."""

    def feed(self, data: bytes) -> None:
        chunk = parse_chunk("decode", data)
        if not self._model and isinstance(chunk.get("model"), str):
            self._model = chunk["model"]
        if isinstance(usage := chunk.get("usage"), dict):
            self.usage = usage
        for raw in chunk["choices"]:
            index = raw.get("index", 0)
            choice = self._choices.get(index)
            if choice is None:
                choice = self._choices[index] = _Choice()
            if self._chat:
                delta = raw.get("delta") or {}
                if isinstance(role := delta.get("role"), str):
                    choice.role = role
                else:
                    self._tokens += 1
                if isinstance(text := delta.get("content"), str):
                    choice.text.append(text)
                    self.size += len(text)
                if isinstance(reasoning := delta.get("reasoning_content"), str):
                    if choice.reasoning is None:
                        choice.reasoning = []
                    choice.reasoning.append(reasoning)
                    self.size += len(reasoning)
            else:
                self._tokens += 1
                if isinstance(text := raw.get("text"), str):
                    choice.text.append(text)
                    self.size += len(text)
            if raw.get("finish_reason") is not None:
                choice.finish_reason = raw["finish_reason"]
                choice.stop_reason = raw.get("stop_reason")

    def body(self, answer_id: str, created: int, prompt_tokens: int) -> dict[str, Any]:
        """`prompt_tokens` (prefill's count) serves when decode sent no usage chunk (a server
        that ignores `stream_options`); its tokens are then counted as on a stream, one per
        chunk."""
        head = ResponseHead(answer_id, created, self._model, self._chat)
        choices = [self._final(head, index, c) for index, c in sorted(self._choices.items())]
        usage = self.usage or {}
        prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
        if not (isinstance(prompt, int) and isinstance(completion, int)):
            prompt, completion = prompt_tokens, self._tokens
        return head.response(choices, vllm_usage(prompt, completion))

    @staticmethod
    def _final(head: ResponseHead, index: int, choice: _Choice) -> dict[str, Any]:
        reasoning = None if choice.reasoning is None else "".join(choice.reasoning)
        text = "".join(choice.text)
        return head.final_choice(
            index, text, choice.finish_reason, choice.stop_reason, reasoning, choice.role
        )
