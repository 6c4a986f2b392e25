"""Prompts whose first sampled token is EOS on a simulator with `--sim-eos-probability`."""

from __future__ import annotations

import asyncio
from typing import Any

from di_router.sim.sequence import SamplingParams
from di_router.sim.sequence import Sequence as SimSequence
from di_router.sim.tokenizer import EOS_TOKEN_ID, prompt_key, render_chat


def first_token_is_eos(text: str, chat: bool, sampling: dict[str, Any], p: float) -> bool:
    source = render_chat([{"role": "user", "content": text}], True) if chat else text
    params = SamplingParams(
        max_tokens=1, temperature=sampling.get("temperature", 1.0), seed=sampling.get("seed")
    )
    seq = SimSequence(
        "probe", 0, 1, prompt_key(source), params, eos_probability=p, outputs=asyncio.Queue()
    )
    return seq.sample() == EOS_TOKEN_ID


def eos_first_prompt(chat: bool, sampling: dict[str, Any], p: float) -> str:
    """A prompt whose first sampled token is EOS on a simulator with `--sim-eos-probability p`."""
    for i in range(100_000):
        text = f"please stop at once {i}"
        if first_token_is_eos(text, chat, sampling, p):
            return text
    raise AssertionError("no EOS-first prompt found")
