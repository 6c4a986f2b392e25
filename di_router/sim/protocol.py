"""Request validation with vLLM 0.7.2's rules and messages (unknown fields are allowed)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from di_router.sim.sequence import SamplingParams
from di_router.sim.tokenizer import prompt_token_count, render_chat

COMPLETION_DEFAULT_MAX_TOKENS = 16


class RequestError(Exception):
    """A client error, reported as an OpenAI error with this status (`param` is always null in
    vLLM 0.7.2: `create_error_response` never sets it)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


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


def _validation_message(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"])
    return f"{where}: {err['msg']}" if where else err["msg"]


def parse_request(
    payload: Any, chat: bool, max_model_len: int, served_models: tuple[str, ...] = ()
) -> ParsedRequest:
    """Schema errors (400), then an unknown model (404), then the semantic checks, as vLLM.

    A KV producer accepts any `max_tokens`, as vLLM does: it generates them all and keeps the
    finished sequence's KV pinned until a consumer pulls it.
    """
    model_cls = ChatCompletionRequest if chat else CompletionRequest
    if not isinstance(payload, dict):
        raise RequestError(400, "The request body must be a JSON object.")
    try:
        body = model_cls.model_validate(payload)
    except ValidationError as exc:
        raise RequestError(400, _validation_message(exc)) from None
    if served_models and body.model not in served_models:
        raise RequestError(404, f"The model `{body.model}` does not exist.")

    prompts = _chat_prompt(body) if chat else _completion_prompts(body)  # type: ignore[arg-type]
    _check_unsupported(body)
    if chat:  # serving_engine._validate_input: `max_completion_tokens or max_tokens`
        requested = body.max_completion_tokens or body.max_tokens  # type: ignore[union-attr]
    else:
        requested = COMPLETION_DEFAULT_MAX_TOKENS if body.max_tokens is None else body.max_tokens
    longest = max(p.num_tokens for p in prompts)
    _check_lengths(longest, requested, max_model_len)
    max_tokens = max_model_len - longest if requested is None else requested
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    _verify_sampling(body, max_tokens, stop)
    stream = bool(body.stream)
    if body.stream_options is not None and not stream:
        raise RequestError(400, "Stream options can only be defined when `stream=True`.")
    options = body.stream_options
    include_usage = bool(options and options.include_usage)
    params = SamplingParams(
        max_tokens=max_tokens,
        min_tokens=body.min_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        seed=body.seed,
        stop=stop,
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
        raise RequestError(400, "suffix is not currently supported")
    prompt = body.prompt
    if isinstance(prompt, str):
        items: list[str | list[int]] = [prompt]
    elif prompt and all(isinstance(p, int) for p in prompt):
        items = [list(prompt)]  # type: ignore[arg-type]
    else:
        items = list(prompt)  # type: ignore[arg-type]
    if not items:
        raise RequestError(400, "prompt must not be empty.")
    return [
        PromptJob(item, prompt_token_count(item), item if isinstance(item, str) else "")
        for item in items
    ]


def _chat_prompt(body: ChatCompletionRequest) -> list[PromptJob]:
    rendered = render_chat(body.messages, body.add_generation_prompt)
    return [PromptJob(rendered, prompt_token_count(rendered), rendered)]


def _check_unsupported(body: _SamplingFields) -> None:
    if body.n != 1:
        raise RequestError(400, "n > 1 is not supported by the simulator.")
    if body.best_of not in (None, 1) or body.use_beam_search:
        raise RequestError(400, "best_of and beam search are not supported by the simulator.")
    if getattr(body, "logprobs", None):
        raise RequestError(400, "logprobs are not supported by the simulator.")


def _check_lengths(prompt_len: int, max_tokens: int | None, max_model_len: int) -> None:
    """`serving_engine._validate_input`: the message says "messages" for completions too."""
    head = f"This model's maximum context length is {max_model_len} tokens. However, you requested"
    if max_tokens is None:
        if prompt_len >= max_model_len:
            raise RequestError(
                400,
                f"{head} {prompt_len} tokens in the messages, "
                "Please reduce the length of the messages.",
            )
    elif prompt_len + max_tokens > max_model_len:
        raise RequestError(
            400,
            f"{head} {prompt_len + max_tokens} tokens ({prompt_len} in the messages, "
            f"{max_tokens} in the completion). Please reduce the length of the messages or "
            "completion.",
        )


def _verify_sampling(body: _SamplingFields, max_tokens: int, stop: tuple[str, ...]) -> None:
    """`SamplingParams._verify_args`, in its order and with its messages (before greedy
    sampling resets top_p/top_k, so `top_p: 0` fails even with temperature 0)."""
    if body.temperature is not None and body.temperature < 0:
        raise RequestError(400, f"temperature must be non-negative, got {body.temperature}.")
    if body.top_p is not None and not 0.0 < body.top_p <= 1.0:
        raise RequestError(400, f"top_p must be in (0, 1], got {body.top_p}.")
    if body.top_k is not None and (body.top_k < -1 or body.top_k == 0):
        raise RequestError(400, f"top_k must be -1 (disable), or at least 1, got {body.top_k}.")
    if max_tokens < 1:
        raise RequestError(400, f"max_tokens must be at least 1, got {max_tokens}.")
    if body.min_tokens < 0:
        raise RequestError(
            400, f"min_tokens must be greater than or equal to 0, got {body.min_tokens}."
        )
    if body.min_tokens > max_tokens:
        raise RequestError(
            400,
            f"min_tokens must be less than or equal to max_tokens={max_tokens}, "
            f"got {body.min_tokens}.",
        )
    if any(not s for s in stop):
        raise RequestError(400, "stop cannot contain an empty string.")
