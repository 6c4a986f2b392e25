"""The request sizes a plan simulates: llmperf's draws, or a replayed run's.

The engine needs token counts only, so no prompt text is built: sizes are drawn with llmperf's
rule (`loadgen.sample_positive_int`: output length, then prompt length, each int(N(mean, sd))
redrawn until positive), 1,000 in a millisecond where `prompts.llmperf_requests` takes seconds
to write the sonnet prompts. A replay takes each record's `number_input_tokens` and
`number_output_tokens` from a `di-router bench` or llmperf individual-responses file, in order.
"""

from __future__ import annotations

import random
from pathlib import Path

import orjson

from di_router.bench.loadgen import RequestSpec, sample_positive_int


class WorkloadError(ValueError):
    """A replay file that cannot be read; the message names the file and the problem."""


def drawn(
    count: int,
    mean_input_tokens: int,
    stddev_input_tokens: float,
    mean_output_tokens: int,
    stddev_output_tokens: float,
    seed: int,
) -> list[RequestSpec]:
    rng = random.Random(seed)
    specs = []
    for _ in range(count):
        output_tokens = sample_positive_int(rng, mean_output_tokens, stddev_output_tokens)
        input_tokens = sample_positive_int(rng, mean_input_tokens, stddev_input_tokens)
        specs.append(RequestSpec("", output_tokens, input_tokens))
    return specs


def replayed(path: Path) -> list[RequestSpec]:
    """Sizes of the successful requests of an individual-responses file (a JSON list)."""
    try:
        records = orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError) as exc:
        raise WorkloadError(f"--replay {path}: {exc}") from None
    if not isinstance(records, list):
        raise WorkloadError(f"--replay {path}: expected a JSON list of per-request records")
    specs = []
    for record in records:
        if not isinstance(record, dict) or record.get("error_code") is not None:
            continue
        try:
            input_tokens = int(record["number_input_tokens"])
            output_tokens = int(record["number_output_tokens"])
        except (KeyError, TypeError, ValueError):
            continue
        if input_tokens > 0 and output_tokens > 0:
            specs.append(RequestSpec("", output_tokens, input_tokens))
    if not specs:
        raise WorkloadError(
            f"--replay {path}: no successful record with number_input_tokens and "
            "number_output_tokens (a `di-router bench` or llmperf *_individual_responses.json)"
        )
    return specs
