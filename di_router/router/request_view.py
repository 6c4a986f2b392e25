"""The few request fields the router itself acts on, coerced exactly as vLLM's pydantic does.

The body goes upstream untouched; but where the router decides something from a field
(streaming or not, fields DI cannot honour, the prefill leg's token limits), it must read
`"stream": 1` or `"n": "1"` the way the servers will, or the two would disagree.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError


class RequestView(BaseModel):
    model_config = ConfigDict(extra="ignore")

    stream: bool | None = False
    n: int | None = None
    best_of: int | None = None
    use_beam_search: bool | None = False
    echo: bool | None = False
    logprobs: bool | int | None = None
    prompt_logprobs: int | None = None
    min_tokens: int | None = None

    @property
    def streaming(self) -> bool:
        return bool(self.stream)


class InvalidField(Exception):
    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param
        self.message = message


def read_request(body: dict[str, Any]) -> RequestView:
    """The router's view of a body; InvalidField names the first field vLLM would refuse."""
    try:
        return RequestView.model_validate(body)
    except ValidationError as exc:
        err = exc.errors()[0]
        param = ".".join(str(p) for p in err["loc"])
        raise InvalidField(param, f"{param}: {err['msg']}") from None
