"""The few request fields the router itself acts on, coerced exactly as vLLM's pydantic does.

The body goes upstream untouched; but where the router decides something from a field
(streaming or not, fields DI cannot honour, the prefill leg's token limits), it must read
`"stream": 1` or `"n": "1"` the way the servers will, or the two would disagree.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, ValidationInfo, model_validator

_COMPLETIONS_DEFAULT_MAX_TOKENS = 16


class StreamOptions(BaseModel):
    include_usage: bool | None = True
    continuous_usage_stats: bool | None = False


class RequestView(BaseModel):
    """Fields the prefill leg rewrites are checked here as vLLM checks them: otherwise prefill
    would accept what decode refuses, and a stream would start before decode's 400."""

    model_config = ConfigDict(extra="ignore")

    stream: bool | None = False
    n: int | None = None
    best_of: int | None = None
    use_beam_search: bool | None = False
    echo: bool | None = False
    logprobs: bool | int | None = None
    prompt_logprobs: int | None = None
    min_tokens: int | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    stream_options: StreamOptions | None = None
    prompt: Any = None

    @model_validator(mode="after")
    def _token_limits(self, info: ValidationInfo) -> RequestView:
        """vLLM 0.7.2's checks, with its messages: chat reads `max_completion_tokens or
        max_tokens` (so 0 falls back), completions ignore `max_completion_tokens` and default
        `max_tokens` to 16."""
        chat = bool(info.context and info.context.get("chat"))
        limit = self.max_tokens
        if chat and self.max_completion_tokens:
            limit = self.max_completion_tokens
        if limit is not None and limit < 1:
            raise ValueError(f"max_tokens must be at least 1, got {limit}.")
        if limit is None and not chat:
            limit = _COMPLETIONS_DEFAULT_MAX_TOKENS
        if self.min_tokens is not None:
            if self.min_tokens < 0:
                raise ValueError(
                    f"min_tokens must be greater than or equal to 0, got {self.min_tokens}."
                )
            if limit is not None and self.min_tokens > limit:
                raise ValueError(
                    f"min_tokens must be less than or equal to max_tokens={limit}, "
                    f"got {self.min_tokens}."
                )
        return self

    @property
    def streaming(self) -> bool:
        return bool(self.stream)

    @property
    def prompt_count(self) -> int:
        """Choices in the answer (n is 1): one per prompt of a completions prompt list."""
        prompt = self.prompt
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            return len(prompt)
        return 1


class InvalidField(Exception):
    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param
        self.message = message


def read_request(body: dict[str, Any], chat: bool = False) -> RequestView:
    """The router's view of a body; InvalidField names the first field vLLM would refuse."""
    try:
        return RequestView.model_validate(body, context={"chat": chat})
    except ValidationError as exc:
        err = exc.errors()[0]
        param = ".".join(str(p) for p in err["loc"])
        if not param:  # a check across fields: its message says it all
            raise InvalidField("", str(err["msg"]).removeprefix("Value error, ")) from None
        raise InvalidField(param, f"{param}: {err['msg']}") from None


def di_unsupported(view: RequestView, chat: bool) -> tuple[str, str] | None:
    """(field, reason) for what no disaggregated server pair can answer exactly, else None."""
    if view.n not in (None, 1):
        return "n", "n > 1 is not supported with disaggregated inference"
    if view.best_of not in (None, 1):
        return "best_of", "best_of > 1 is not supported with disaggregated inference"
    if view.use_beam_search:
        return "use_beam_search", "beam search is not supported with disaggregated inference"
    if view.prompt_logprobs is not None:
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
