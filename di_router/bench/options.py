"""The flags `di-router bench` and `di-router bench compare` share, and what they turn into."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from di_router.bench import llmperf_results, loadgen, runner

DEFAULT_MODEL = "llama-3.3-70b"  # the model name `di-router demo` serves


def sampling_params(text: str) -> dict[str, Any]:
    """`--additional-sampling-params`: a JSON object merged into every request body."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def add_workload_args(p: argparse.ArgumentParser, *, tutorial: bool) -> None:
    """The flags both commands share: llmperf's defaults for `bench`; for `compare` the DI
    tutorial's, left None where `--quick` scales them down."""
    p.add_argument("--model", default=DEFAULT_MODEL, help="model name sent in every request")
    scaled = " (default: the tutorial's 1024; 256 with --quick)" if tutorial else ""
    p.add_argument(
        "--mean-input-tokens",
        type=int,
        default=None if tutorial else 550,
        help="prompt tokens per request, drawn from N(mean, stddev), BOS included" + scaled,
    )
    p.add_argument("--stddev-input-tokens", type=float, default=0 if tutorial else 150)
    p.add_argument(
        "--mean-output-tokens",
        type=int,
        default=None if tutorial else 150,
        help="max_tokens per request, drawn from N(mean, stddev); exact with ignore_eos",
    )
    p.add_argument("--stddev-output-tokens", type=float, default=None if tutorial else 80)
    p.add_argument(
        "--max-num-completed-requests",
        type=int,
        default=None if tutorial else 10,
        help="requests per run",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=1720000 if tutorial else 90,
        help="seconds after which no new request is sent (llmperf's whole-run budget)",
    )
    p.add_argument(
        "--additional-sampling-params",
        type=sampling_params,
        default=dict(loadgen.TUTORIAL_SAMPLING) if tutorial else {},
        help="JSON object merged into every request, e.g. '{\"top_k\": 50}'",
    )
    p.add_argument("--llm-api", choices=["openai"], default="openai", help="accepted; the only API")
    p.add_argument(
        "--endpoint",
        choices=["chat", "completions"],
        default="chat",
        help="chat (as llmperf) or completions",
    )
    p.add_argument(
        "--request-rate",
        type=float,
        default=None,
        help="requests/s with Poisson arrivals (open loop), at most the concurrency in flight; "
        "default: closed loop, as llmperf",
    )
    p.add_argument("--seed", type=int, default=11111, help="prompts, lengths and arrivals")
    p.add_argument(
        "--itl-definition",
        choices=llmperf_results.ITL_DEFINITIONS,
        default="neuron",
        help="headline inter-token latency: llmperf's (TTFT + gaps) / tokens, neuron's patched "
        "gaps / (tokens - 1), or vLLM bench's pooled gaps (all three are in the files)",
    )
    p.add_argument(
        "--tokenizer",
        default=None,
        help="tokenizer.json, a model directory holding one, or a package shipping one "
        "(needs the 'tokenizers' package); default: the simulator's counting rule",
    )


def base_urls(value: str) -> str:
    """`http://h:p/v1;http://h2:p2` -> `http://h:p;http://h2:p2` (the load generator adds /v1)."""
    bases = []
    for base in value.split(";"):
        base = base.strip().rstrip("/")
        if base:
            bases.append(base.removesuffix("/v1"))
    if not bases:
        raise ValueError("no server URL")
    return ";".join(bases)


def workload(args: argparse.Namespace, concurrency: int) -> runner.Workload:
    return runner.Workload(
        model=args.model,
        mean_input_tokens=args.mean_input_tokens,
        stddev_input_tokens=args.stddev_input_tokens,
        mean_output_tokens=args.mean_output_tokens,
        stddev_output_tokens=args.stddev_output_tokens,
        max_num_completed_requests=args.max_num_completed_requests,
        num_concurrent_requests=concurrency,
        timeout_s=args.timeout,
        sampling=args.additional_sampling_params,
        endpoint=args.endpoint,
        request_rate=args.request_rate,
        seed=args.seed,
        itl_definition=args.itl_definition,
        api_key=os.environ.get("OPENAI_API_KEY") or "EMPTY",
    )
