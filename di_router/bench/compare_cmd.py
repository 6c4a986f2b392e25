"""`di-router bench compare`: the DI tutorial's comparison (DI stack vs one colocated server).

Starts a simulated baseline and a simulated DI stack (or takes their URLs), runs the same
llmperf workload on each at every `--concurrency`, one side after the other so they never share
the machine, and writes into `--results-dir`: llmperf's files per side and concurrency
(`<side>/c<N>/`), `report.md` (table, verdict, plots), `compare.json` and the PNG plots.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import shlex
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from di_router.bench import compare_report, report, runner, stack
from di_router.bench.compare_report import SIDES, Comparison
from di_router.bench.options import add_workload_args, base_urls, workload
from di_router.bench.tokenizer import TokenizerError, load_tokenizer
from di_router.sim.profiles import DEFAULT_PROFILE, PROFILES

# The Neuron DI tutorial's llmperf run, and a laptop-sized version of it (`--quick`).
TUTORIAL = {
    "mean_input_tokens": 1024,
    "mean_output_tokens": 100,
    "stddev_output_tokens": 10.0,
    "max_num_completed_requests": 200,
}
QUICK = {
    "mean_input_tokens": 256,
    "mean_output_tokens": 32,
    "stddev_output_tokens": 4.0,
    "max_num_completed_requests": 16,
}


def concurrency_list(text: str) -> list[int]:
    try:
        values = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected e.g. 1,2,4,8,16: {exc}") from exc
    if not values or values[0] < 1:
        raise argparse.ArgumentTypeError("concurrencies must be positive integers")
    return values


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "compare",
        help="the tutorial's DI vs non-DI comparison, with a report and plots",
        description="Run one llmperf workload on a DI stack and on a colocated baseline "
        "(simulated unless URLs are given) and write a side-by-side report with plots. "
        "Defaults: the Neuron DI tutorial's workload (1024 in, 100 +/- 10 out, concurrency 4, "
        "200 requests, top_k 50 / top_p 0.9 / temperature 0.7).",
    )
    add_workload_args(p, tutorial=True)
    p.add_argument(
        "--concurrency",
        type=concurrency_list,
        default=[4],
        help="comma-separated sweep, e.g. 1,2,4,8,16 (default 4)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="a laptop-sized run: 256 in, 32 +/- 4 out, 16 requests (explicit flags still win)",
    )
    p.add_argument(
        "--sim-profile",
        choices=sorted(PROFILES),
        default=DEFAULT_PROFILE,
        help="timing profile of the simulated servers",
    )
    p.add_argument(
        "--max-num-seqs", type=int, default=4, help="batch of every simulated server (tutorial: 4)"
    )
    p.add_argument(
        "--di-url", default=None, help="an existing DI router instead of a simulated one"
    )
    p.add_argument("--baseline-url", default=None, help="an existing non-DI server")
    p.add_argument(
        "--baseline-throughput-factor",
        type=float,
        default=2.0,
        help="multiply the baseline's throughput by this for hardware parity (the tutorial's "
        "single-instance baseline uses half the cores: 2)",
    )
    p.add_argument("--results-dir", default="bench-compare", help="where the report goes")
    p.set_defaults(func=run)


def resolve(args: argparse.Namespace) -> None:
    """Fill the sizes left None: the quick ones with `--quick`, else the tutorial's."""
    for key, value in (QUICK if args.quick else TUTORIAL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)


@contextlib.contextmanager
def serving(side: str, args: argparse.Namespace) -> Iterator[tuple[str, str]]:
    """(base URL, one-line description) of a side: the given URL, or a simulated stack."""
    url = args.di_url if side == "di" else args.baseline_url
    if url:
        yield base_urls(url), f"given server {url}"
        return
    start = stack.di if side == "di" else stack.baseline
    shape = "prefill + decode simulators behind the router" if side == "di" else "one simulator"
    with start(args.sim_profile, args.max_num_seqs) as running:
        yield (
            running.url,
            f"{shape}, profile `{args.sim_profile}`, --max-num-seqs {args.max_num_seqs}",
        )


def _exit_on_sigterm() -> None:
    """`timeout` and service managers stop with SIGTERM: leave through the stacks' cleanup, so
    no simulator or router outlives the command."""
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))


def run(args: argparse.Namespace) -> int:
    resolve(args)
    _exit_on_sigterm()
    simulated = not (args.di_url and args.baseline_url)
    if simulated and args.model != stack.MODEL:
        print(
            f"di-router bench compare: simulated servers serve {stack.MODEL!r}; "
            "--model is for --di-url/--baseline-url",
            file=sys.stderr,
        )
        return 2
    try:
        tokenizer = load_tokenizer(args.tokenizer)
    except TokenizerError as exc:
        print(f"di-router bench compare: {exc}", file=sys.stderr)
        return 2
    out = Path(args.results_dir)
    runs: dict[str, dict[int, runner.BenchResult]] = {side: {} for side in SIDES}
    setup: dict[str, str] = {}
    for side in SIDES:  # one after the other: the two never compete for the machine
        with serving(side, args) as (url, description):
            setup[side] = description
            for c in args.concurrency:
                result = runner.execute(
                    workload(args, c), tokenizer, url, out / side / f"c{c}", f"{side} c={c} "
                )
                s = result.stats
                print(
                    f"{side} c={c}: {s.completed} ok, {s.errors} errors, "
                    f"{s.requests_per_minute:.1f} req/min",
                    flush=True,
                )
                runs[side][c] = result
    cmp = Comparison(runs, args.baseline_throughput_factor, setup)
    plots = _plots(cmp, out)
    environment = report.environment()
    command = shlex.join(["di-router", *sys.argv[1:]])
    text = compare_report.markdown(cmp, plots, environment, command)
    (out / "report.md").write_text(text)
    report.write_json(out / "compare.json", _json(cmp, environment))
    print("\n" + text)
    print(f"wrote {out / 'report.md'}")
    return 1 if any(r.stats.errors for side in runs.values() for r in side.values()) else 0


def _plots(cmp: Comparison, out: Path) -> list[str]:
    if importlib.util.find_spec("matplotlib") is None:
        print("no plots: matplotlib is missing (pip install 'di-router[bench]')", file=sys.stderr)
        return []
    from di_router.bench import plots

    return plots.write_all(cmp, out)


def _json(cmp: Comparison, environment: dict[str, Any]) -> dict[str, Any]:
    """Every run's llmperf summary, by side and concurrency, with the verdicts."""
    return {
        "environment": environment,
        "setup": dict(cmp.setup),
        "baseline_throughput_factor": cmp.factor,
        "runs": {side: {str(c): r.summary for c, r in cmp.runs[side].items()} for side in SIDES},
        "verdicts": {str(c): compare_report.verdict(cmp, c) for c in cmp.concurrencies},
    }
