"""One generated sequence: deterministic sampling and vLLM's stop rules.

A token is a function of (prompt, sampling stream, previous token, position) only, so a decode
server that is handed the first token continues exactly as a baseline server that sampled it.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from di_router.sim.tokenizer import EOS_TOKEN_ID, FIRST_WORD_ID, VOCAB, token_text

_WORDS = len(VOCAB) - FIRST_WORD_ID


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    min_tokens: int = 0
    temperature: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: frozenset[int] = frozenset()
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False

    def sampling_stream(self) -> int:
        """0 for greedy; a seed-derived stream when seeded; a fresh random one otherwise."""
        if self.temperature == 0:
            return 0
        if self.seed is not None:
            return (self.seed * 0x9E3779B97F4A7C15 + 1) & 0xFFFFFFFFFFFFFFFF or 1
        return random.getrandbits(63) | 1


@dataclass(frozen=True)
class TokenOutput:
    token_id: int
    text: str
    finish_reason: str | None = None
    stop_reason: str | int | None = None


@dataclass(frozen=True)
class SequenceError:
    status: int
    message: str


@dataclass(eq=False)
class Sequence:
    engine_id: str
    index: int
    prompt_tokens: int
    prompt_key: int
    params: SamplingParams
    eos_probability: float = 0.0
    stream: int = 0
    generated: list[int] = field(default_factory=list)
    text: str = ""
    outputs: asyncio.Queue[tuple[int, TokenOutput | SequenceError]] = field(
        default_factory=asyncio.Queue
    )
    finished: bool = False
    aborted: bool = False
    kv_pending: bool = False
    """Producer: its KV has not left yet, so a finished sequence keeps its slot."""
    kv_pull: Callable[[], Awaitable[tuple[int, int]]] | None = None
    """Where this request's KV comes from, whatever the engine's role: the remote named by
    vLLM V1's `kv_transfer_params`, or the Neuron 2.26 peer named in the request id."""
    kv_offer: bool = False
    """vLLM V1 `do_remote_decode`: keep the KV for a remote pull if the request ends capped."""
    v1: bool = False
    """vLLM V1 semantics: a consumer computes its first token itself, and an abort also frees a
    request still waiting for its KV (V1's scheduler finds it in `waiting`)."""
    finish_reason: str | None = None
    arrived_at: float = 0.0
    scheduled_at: float = 0.0
    first_token_at: float = 0.0
    last_token_at: float = 0.0

    def __post_init__(self) -> None:
        self.stream = self.params.sampling_stream()

    def sample(self) -> int:
        prev = self.generated[-1] if self.generated else -1
        digest = hashlib.blake2b(
            struct.pack("<QQqq", self.prompt_key, self.stream, prev, len(self.generated)),
            digest_size=16,
        ).digest()
        eos_allowed = not self.params.ignore_eos and len(self.generated) >= self.params.min_tokens
        if eos_allowed and int.from_bytes(digest[8:], "big") < self.eos_probability * 2**64:
            return EOS_TOKEN_ID
        return FIRST_WORD_ID + int.from_bytes(digest[:8], "big") % _WORDS

    def append(self, token_id: int) -> TokenOutput:
        """Add a token and apply vLLM's stop checks (none before `min_tokens` are generated)."""
        self.generated.append(token_id)
        delta = token_text(token_id)
        params = self.params
        finish: str | None = None
        stop_reason: str | int | None = None
        if len(self.generated) >= params.min_tokens:
            if token_id == EOS_TOKEN_ID and not params.ignore_eos:
                finish = "stop"
            elif token_id in params.stop_token_ids:
                # vLLM's StopChecker drops a stop token's text unless asked to keep it.
                finish, stop_reason = "stop", token_id
                delta = delta if params.include_stop_str_in_output else ""
            elif params.stop:
                delta, stop_reason = self._truncate_at_stop(delta)
                finish = "stop" if stop_reason is not None else None
        if finish is None and len(self.generated) >= params.max_tokens:
            finish = "length"
        self.text += delta
        self.finished = finish is not None
        self.finish_reason = finish
        return TokenOutput(token_id, delta, finish, stop_reason)

    def _truncate_at_stop(self, delta: str) -> tuple[str, str | None]:
        full = self.text + delta
        search_from = max(0, len(self.text) - max(map(len, self.params.stop)))
        hits = [(full.find(s, search_from), s) for s in self.params.stop]
        hits = [(pos, s) for pos, s in hits if pos >= 0]
        if not hits:
            return delta, None
        pos, stop = min(hits)
        end = pos + len(stop) if self.params.include_stop_str_in_output else pos
        return full[len(self.text) : max(end, len(self.text))], stop
