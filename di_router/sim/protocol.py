"""Request validation with vLLM 0.7.2's rules and messages (unknown fields are allowed)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from di_router.sim.sequence import SamplingParams
from di_router.sim.tokenizer import prompt_token_count, render_chat

COMPLETION_DEFAULT_MAX_TOKENS = 16


class RequestError(Exception):
    """A client error, reported as an OpenAI error with this status."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param


class StreamOptions(BaseModel):
    include_usage: bool | None = True  # 0.7.2: an object present means usage unless false
    continuous_usage_stats: bool | None = False


class _SamplingFields(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    n: int = 1
    best_of: int | None = None
    use_beam_search: bool = False
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    include_stop_str_in_output: bool = False
    echo: bool = False


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    suffix: str | None = None
    logprobs: int | None = None


class ChatCompletionRequest(_SamplingFields):
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_completion_tokens: int | None = None
    add_generation_prompt: bool = True
    logprobs: bool | None = False
    top_logprobs: int | None = None


@dataclass(frozen=True)
class PromptJob:
    key_source: str | list[int]
    num_tokens: int
    text: str


@dataclass(frozen=True)
class ParsedRequest:
    body: _SamplingFields
    prompts: list[PromptJob]
    params: SamplingParams
    stream: bool
    include_usage: bool
    continuous_usage: bool


def _validation_message(exc: ValidationError) -> tuple[str, str | None]:
    err = exc.errors()[0]
    param = ".".join(str(p) for p in err["loc"]) or None
    return f"{param}: {err['msg']}" if param else err["msg"], param


def parse_request(
    payload: Any,
    chat: bool,
    max_model_len: int,
    producer: bool,
    served_models: tuple[str, ...] = (),
) -> ParsedRequest:
    """Schema errors (400), then an unknown model (404), then the semantic checks, as vLLM."""
    model_cls = ChatCompletionRequest if chat else CompletionRequest
    if not isinstance(payload, dict):
        raise RequestError(400, "The request body must be a JSON object.")
    try:
        body = model_cls.model_validate(payload)
    except ValidationError as exc:
        message, param = _validation_message(exc)
        raise RequestError(400, message, param) from None
    if served_models and body.model not in served_models:
        raise RequestError(404, f"The model `{body.model}` does not exist.", "model")

    prompts = _chat_prompt(body) if chat else _completion_prompts(body)  # type: ignore[arg-type]
    _check_unsupported(body)
    max_tokens = body.max_tokens
    if chat and body.max_completion_tokens is not None:  # type: ignore[union-attr]
        max_tokens = body.max_completion_tokens  # type: ignore[union-attr]
    longest = max(p.num_tokens for p in prompts)
    if max_tokens is None:
        max_tokens = max_model_len - longest if chat else COMPLETION_DEFAULT_MAX_TOKENS
    _check_lengths(longest, max_tokens, max_model_len, chat)
    if max_tokens < 1:
        raise RequestError(400, f"max_tokens must be at least 1, got {max_tokens}.", "max_tokens")
    if body.min_tokens < 0 or body.min_tokens > max_tokens:
        raise RequestError(
            400,
            f"min_tokens must be greater than or equal to 0 and less than or equal to "
            f"max_tokens={max_tokens}, got {body.min_tokens}.",
            "min_tokens",
        )
    if body.temperature is not None and body.temperature < 0:
        raise RequestError(400, f"temperature must be non-negative, got {body.temperature}.")
    if producer and max_tokens != 1:
        raise RequestError(
            400,
            f"This server is a KV producer (prefill): max_tokens must be 1, got {max_tokens}.",
            "max_tokens",
        )
    stream = bool(body.stream)
    if body.stream_options is not None and not stream:
        raise RequestError(400, "Stream options can only be defined when `stream=True`.")
    options = body.stream_options
    include_usage = bool(options and options.include_usage)
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    params = SamplingParams(
        max_tokens=max_tokens,
        min_tokens=body.min_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        seed=body.seed,
        stop=tuple(s for s in stop if s),
        stop_token_ids=frozenset(body.stop_token_ids or ()),
        ignore_eos=body.ignore_eos,
        include_stop_str_in_output=body.include_stop_str_in_output,
    )
    return ParsedRequest(
        body,
        prompts,
        params,
        stream,
        include_usage,
        include_usage and bool(options and options.continuous_usage_stats),
    )


def _completion_prompts(body: CompletionRequest) -> list[PromptJob]:
    if body.suffix is not None:
        raise RequestError(400, "suffix is not currently supported", "suffix")
    prompt = body.prompt
    if isinstance(prompt, str):
        items: list[str | list[int]] = [prompt]
    elif prompt and all(isinstance(p, int) for p in prompt):
        items = [list(prompt)]  # type: ignore[arg-type]
    else:
        items = list(prompt)  # type: ignore[arg-type]
    if not items:
        raise RequestError(400, "prompt must not be empty.", "prompt")
    return [
        PromptJob(item, prompt_token_count(item), item if isinstance(item, str) else "")
        for item in items
    ]


def _chat_prompt(body: ChatCompletionRequest) -> list[PromptJob]:
    rendered = render_chat(body.messages, body.add_generation_prompt)
    return [PromptJob(rendered, prompt_token_count(rendered), rendered)]


def _check_unsupported(body: _SamplingFields) -> None:
    if body.n != 1:
        raise RequestError(400, "n > 1 is not supported by the simulator.", "n")
    if body.best_of not in (None, 1) or body.use_beam_search:
        raise RequestError(400, "best_of and beam search are not supported by the simulator.")
    if getattr(body, "logprobs", None):
        raise RequestError(400, "logprobs are not supported by the simulator.", "logprobs")


def _check_lengths(prompt_len: int, max_tokens: int, max_model_len: int, chat: bool) -> None:
    if prompt_len + max_tokens > max_model_len or prompt_len >= max_model_len:
        where = "messages" if chat else "prompt"
        raise RequestError(
            400,
            f"This model's maximum context length is {max_model_len} tokens. However, you "
            f"requested {prompt_len + max_tokens} tokens ({prompt_len} in the {where}, "
            f"{max_tokens} in the completion). Please reduce the length of the {where} or "
            "completion.",
        )
