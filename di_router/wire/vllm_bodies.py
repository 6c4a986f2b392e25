"""Response bodies and stream chunks with vLLM 0.7.2's exact keys: the simulator sends them,
the router rebuilds a whole answer from a stream with them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ResponseHead:
    id: str
    created: int
    model: str
    chat: bool

    def chunk(self, choices: list[dict[str, Any]], usage: dict[str, int] | None) -> dict[str, Any]:
        if self.chat:
            body: dict[str, Any] = {
                "id": self.id,
                "object": "chat.completion.chunk",
                "created": self.created,
                "model": self.model,
                "choices": choices,
            }
            if usage is not None:
                body["usage"] = usage
            return body
        return {
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
            "usage": usage,
        }

    def role_choice(self, index: int) -> dict[str, Any]:
        return {
            "index": index,
            "delta": {"role": "assistant", "content": ""},
            "logprobs": None,
            "finish_reason": None,
        }

    def token_choice(
        self, index: int, text: str, finish_reason: str | None, stop_reason: str | int | None
    ) -> dict[str, Any]:
        if self.chat:
            choice: dict[str, Any] = {
                "index": index,
                "delta": {"content": text},
                "logprobs": None,
                "finish_reason": finish_reason,
            }
            if finish_reason is not None:
                choice["stop_reason"] = stop_reason
            return choice
        return {
            "index": index,
            "text": text,
            "logprobs": None,
            "finish_reason": finish_reason,
            "stop_reason": stop_reason,
        }

    def final_choice(
        self,
        index: int,
        text: str,
        finish_reason: str | None,
        stop_reason: str | int | None,
        reasoning: str | None = None,
        role: str = "assistant",
    ) -> dict[str, Any]:
        if self.chat:
            message: dict[str, Any] = {
                "role": role,
                "reasoning_content": reasoning,
                "content": text,
                "tool_calls": [],
            }
            return {
                "index": index,
                "message": message,
                "logprobs": None,
                "finish_reason": finish_reason,
                "stop_reason": stop_reason,
            }
        # A whole completion's choice is its stream chunk's, plus `prompt_logprobs`.
        choice = self.token_choice(index, text, finish_reason, stop_reason)
        return {**choice, "prompt_logprobs": None}

    def response(self, choices: list[dict[str, Any]], usage: dict[str, Any]) -> dict[str, Any]:
        body: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion" if self.chat else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
            "usage": usage,
        }
        if self.chat:
            body["prompt_logprobs"] = None
        return body


def usage(prompt_tokens: int, completion_tokens: int, details: bool = True) -> dict[str, Any]:
    body: dict[str, Any] = {
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "completion_tokens": completion_tokens,
    }
    if details:
        body["prompt_tokens_details"] = None
    return body
