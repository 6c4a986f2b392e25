"""A DI stack (prefill + decode + router) beside a baseline server with the same settings."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from di_router.sim.sequence import SamplingParams
from di_router.sim.sequence import Sequence as SimSequence
from di_router.sim.tokenizer import EOS_TOKEN_ID, prompt_key, render_chat
from tests.support import Proc, free_port, start_router, start_sim, wait_until


@dataclass
class Stack:
    baseline: Proc | None
    prefill: Proc
    decode: Proc
    router: Proc


@contextlib.contextmanager
def di_stack(
    sim_extra: Sequence[str] = (),
    prefill_extra: Sequence[str] = (),
    decode_extra: Sequence[str] = (),
    router_extra: Sequence[str] = (),
    baseline: bool = True,
    profile: str = "instant",
) -> Iterator[Stack]:
    kv_port = free_port()
    procs: list[Proc] = []
    try:
        base = start_sim("baseline", profile=profile, extra=sim_extra) if baseline else None
        prefill = start_sim("prefill", kv_port=kv_port, profile=profile,
                            extra=[*sim_extra, *prefill_extra])
        decode = start_sim("decode", kv_port=kv_port, profile=profile,
                           extra=[*sim_extra, *decode_extra])
        procs = [p for p in (base, prefill, decode) if p is not None]
        router = start_router(prefill, decode, extra=["--health-interval", "0.2", *router_extra])
        procs.append(router)
        for proc in procs:
            proc.wait_ready()
        wait_until(lambda: httpx.get(router.url + "/ready").status_code == 200, 10, "router /ready")
        yield Stack(base, prefill, decode, router)
    finally:
        for proc in reversed(procs):
            proc.stop()


def first_token_is_eos(text: str, chat: bool, sampling: dict[str, Any], p: float) -> bool:
    source = render_chat([{"role": "user", "content": text}], True) if chat else text
    params = SamplingParams(
        max_tokens=1, temperature=sampling.get("temperature", 1.0), seed=sampling.get("seed")
    )
    seq = SimSequence("probe", 0, 1, prompt_key(source), params, eos_probability=p,
                      outputs=asyncio.Queue())
    return seq.sample() == EOS_TOKEN_ID


def eos_first_prompt(chat: bool, sampling: dict[str, Any], p: float) -> str:
    """A prompt whose first sampled token is EOS on a simulator with `--sim-eos-probability p`."""
    for i in range(100_000):
        text = f"please stop at once {i}"
        if first_token_is_eos(text, chat, sampling, p):
            return text
    raise AssertionError("no EOS-first prompt found")
