"""`di-router bench`: llmperf's command line, without Ray or a Hugging Face download.

The tutorial's `llmperf.sh` runs with only the program name changed: same flags, same
`OPENAI_API_BASE` / `OPENAI_API_KEY` (several bases separated by `;` are taken in turn, as with
Neuron's `llmperf_dp.patch`), same result files and closing lines. `di-router bench compare`
(in `compare_cmd`) runs one workload on a DI stack and on a baseline and reports both.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from di_router.bench import compare_cmd, llmperf_results, runner
from di_router.bench.options import add_workload_args, base_urls, workload
from di_router.bench.tokenizer import TokenizerError, load_tokenizer


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "bench",
        help="llmperf's benchmark (same flags, files and summary), or 'bench compare'",
        description="Run llmperf's token benchmark against an OpenAI-compatible server: "
        "OPENAI_API_BASE (or --url) and OPENAI_API_KEY, as llmperf reads them.",
    )
    add_workload_args(p, tutorial=False)
    p.add_argument("--num-concurrent-requests", type=int, default=10, help="closed-loop workers")
    p.add_argument(
        "--results-dir", default="", help="write llmperf's summary and individual files here"
    )
    p.add_argument(
        "--url",
        default=None,
        help="server base URL(s), ';'-separated, instead of OPENAI_API_BASE",
    )
    p.set_defaults(func=run)
    commands = p.add_subparsers(dest="bench_command", metavar="{compare}")
    compare_cmd.add_parser(commands)


def run(args: argparse.Namespace) -> int:
    raw_url = args.url or os.environ.get("OPENAI_API_BASE", "")
    if not raw_url.strip(";/ "):
        print("di-router bench: set OPENAI_API_BASE or pass --url", file=sys.stderr)
        return 2
    try:
        tokenizer = load_tokenizer(args.tokenizer)
    except TokenizerError as exc:
        print(f"di-router bench: {exc}", file=sys.stderr)
        return 2
    plan = workload(args, args.num_concurrent_requests)
    results_dir = Path(args.results_dir) if args.results_dir else None
    result = runner.execute(plan, tokenizer, base_urls(raw_url), results_dir)
    print(f"Results for token benchmark for {plan.model} queried with the openai api.\n")
    print("\n".join(llmperf_results.summary_lines(result.summary)))
    print("\n" + runner.table(result))
    return 1 if result.stats.errors else 0
