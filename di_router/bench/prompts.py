"""llmperf's workload: sonnet-line prompts of a sampled token count, and sampled output lengths.

As llmperf's `randomly_sample_sonnet_lines_prompt`: an instruction naming the output length,
then shuffled sonnet lines (Shakespeare's, public domain, shipped as `sonnets.txt`) until the
prompt holds the sampled number of tokens, the last line cut to fit; the count includes BOS.
Unlike llmperf, the whole prompt is counted (llmperf counts a BOS for every line, so its
prompts come out shorter than requested), which makes sizes exact for the simulator.
"""

from __future__ import annotations

import functools
import importlib.resources
import random

from di_router.bench.loadgen import RequestSpec, sample_positive_int
from di_router.bench.tokenizer import Tokenizer


@functools.cache
def sonnet_lines() -> tuple[str, ...]:
    text = importlib.resources.files("di_router.bench").joinpath("sonnets.txt").read_text()
    return tuple(line + "\n" for line in text.splitlines() if line.strip())


def instruction(output_tokens: int) -> str:
    return (
        f"Randomly stream lines from the following text with {output_tokens} output tokens. "
        "Don't generate eos tokens:\n\n"
    )


def sonnet_prompt(
    tokenizer: Tokenizer, rng: random.Random, prompt_tokens: int, output_tokens: int
) -> str:
    """A prompt of `prompt_tokens` tokens (at least the instruction's own count)."""
    prompt = instruction(output_tokens)
    remaining = prompt_tokens - tokenizer.count_prompt(prompt)
    lines = list(sonnet_lines())
    rng.shuffle(lines)
    while remaining > 0:
        for line in lines:
            cost = tokenizer.count_output(line)
            if cost > remaining:
                return prompt + _longest_fitting_prefix(tokenizer, prompt, line, prompt_tokens)
            prompt += line
            remaining -= cost
            if remaining == 0:
                break
    return prompt


def _longest_fitting_prefix(tokenizer: Tokenizer, prompt: str, line: str, budget: int) -> str:
    """Binary search on characters: the longest start of `line` that keeps the prompt in budget."""
    lo, hi = 0, len(line)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if tokenizer.count_prompt(prompt + line[:mid]) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return line[:lo]


def llmperf_requests(
    tokenizer: Tokenizer,
    count: int,
    mean_input_tokens: int,
    stddev_input_tokens: float,
    mean_output_tokens: int,
    stddev_output_tokens: float,
    seed: int,
) -> list[RequestSpec]:
    """Draw every request before the clock starts, as llmperf does: output length first, then a
    prompt length no shorter than the instruction (redrawn like llmperf, at most a few times)."""
    rng = random.Random(seed)
    specs = []
    for _ in range(count):
        output_tokens = sample_positive_int(rng, mean_output_tokens, stddev_output_tokens)
        floor = tokenizer.count_prompt(instruction(output_tokens))
        prompt_tokens = sample_positive_int(rng, mean_input_tokens, stddev_input_tokens)
        for _ in range(100):
            if prompt_tokens >= floor or not stddev_input_tokens:
                break
            prompt_tokens = sample_positive_int(rng, mean_input_tokens, stddev_input_tokens)
        prompt_tokens = max(prompt_tokens, floor)
        prompt = sonnet_prompt(tokenizer, rng, prompt_tokens, output_tokens)
        specs.append(RequestSpec(prompt, output_tokens, tokenizer.count_prompt(prompt)))
    return specs
