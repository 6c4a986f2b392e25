"""The DI protocol as a replaceable strategy: how one client request becomes two upstream legs.

`NeuronFirstToken` is the Neuron vLLM fork's protocol (the one `neuron-proxy-server` speaks):
both legs go out at once with one shared `X-Request-Id`, from which both servers derive the
engine request id that pairs their KV; prefill returns the first token, and decode repeats it as
its own first output before continuing. A vLLM V1 NIXL strategy (sequential, with
`kv_transfer_params`) can implement the same interface.
"""

from __future__ import annotations

from typing import Any, Protocol

from di_router.router.request_view import RequestView


class DIStrategy(Protocol):
    name: str

    def unsupported(self, view: RequestView, chat: bool) -> tuple[str, str] | None:
        """(field, reason) for a request this protocol cannot answer exactly, else None."""

    def prefill_body(self, body: dict[str, Any], view: RequestView) -> dict[str, Any]:
        """The body the prefill leg sends."""


class NeuronFirstToken:
    name = "neuron-first-token"

    def unsupported(self, view: RequestView, chat: bool) -> tuple[str, str] | None:
        if view.n not in (None, 1):
            return "n", "n > 1 is not supported with disaggregated inference"
        if view.best_of not in (None, 1):
            return "best_of", "best_of > 1 is not supported with disaggregated inference"
        if view.use_beam_search:
            return "use_beam_search", "beam search is not supported with disaggregated inference"
        if view.prompt_logprobs:
            return "prompt_logprobs", (
                "prompt_logprobs cannot be computed: the decode server skips the prompt's forward "
                "pass when it receives the KV cache"
            )
        if not chat and view.echo and view.logprobs is not None:
            return "logprobs", (
                "echo with logprobs needs prompt logprobs, which the decode server cannot compute "
                "with disaggregated inference"
            )
        return None

    def prefill_body(self, body: dict[str, Any], view: RequestView) -> dict[str, Any]:
        """Cap generation at the first token; everything else that shapes it stays the same."""
        prefill = dict(body)
        prefill["max_tokens"] = 1
        if "max_completion_tokens" in prefill:
            prefill["max_completion_tokens"] = 1
        # Keep "no EOS as the first token" (min_tokens >= 1) while staying <= max_tokens.
        prefill.pop("min_tokens", None)
        if view.min_tokens is not None and view.min_tokens >= 1:
            prefill["min_tokens"] = 1
        prefill.pop("min_completion_tokens", None)
        prefill.pop("stream_options", None)
        if view.streaming:
            # The router drops this usage chunk; it only tells the router the prompt size.
            prefill["stream_options"] = {"include_usage": True}
        return prefill
