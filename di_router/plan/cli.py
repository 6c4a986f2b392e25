"""`di-router plan`: should I disaggregate, and with how many prefill and decode servers?

Simulates every candidate layout (colocated servers, xPyD) on the workload in virtual time, on
the simulator's engine and timing profile, and writes into `--results-dir`: `plan.md` (table,
recommendation, commands), `plan.json` and `pareto.png`.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from di_router.bench import report as bench_report
from di_router.plan import commands, layouts, report, sweep, workload
from di_router.plan.simulate import Load

DEFAULT_FAMILY = "trn2-llama3.3-70b"
DEFAULT_MODEL_PATH = "~/models/Llama-3.3-70B-Instruct"
REQUESTS, QUICK_REQUESTS = 1000, 200


def _positive(kind: type[float] | type[int]) -> Any:
    def parse(text: str) -> float | int:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError("must be positive")
        return value

    return parse


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "plan",
        help="should I disaggregate? every layout simulated in virtual time, one recommended",
        description="Simulate colocated and xPyD layouts on a budget of trn2.48xlarge instances "
        "for one workload (the simulator's engine and timing profile, in virtual time), and "
        "recommend the one with the most goodput per instance within the SLOs. Defaults: the "
        "Neuron DI tutorial's workload (1024 input tokens, 100 +/- 10 output).",
    )
    load = p.add_mutually_exclusive_group()
    load.add_argument(
        "--request-rate",
        type=_positive(float),
        default=None,
        help="requests/s, Poisson arrivals (default 1.0 unless --concurrency)",
    )
    load.add_argument(
        "--concurrency", type=_positive(int), default=None, help="closed loop, llmperf's way"
    )
    p.add_argument("--mean-input-tokens", type=_positive(int), default=1024)
    p.add_argument("--stddev-input-tokens", type=float, default=0.0)
    p.add_argument("--mean-output-tokens", type=_positive(int), default=100)
    p.add_argument("--stddev-output-tokens", type=float, default=10.0)
    p.add_argument(
        "--max-num-completed-requests",
        type=_positive(int),
        default=None,
        help=f"requests per layout (default {REQUESTS}; {QUICK_REQUESTS} with --quick)",
    )
    p.add_argument(
        "--replay",
        type=Path,
        default=None,
        help="take request sizes from a `di-router bench` or llmperf individual-responses file",
    )
    p.add_argument("--ttft-p99", type=_positive(float), default=None, help="TTFT SLO, seconds")
    p.add_argument(
        "--itl-p99", type=_positive(float), default=None, help="inter-token latency SLO, seconds"
    )
    p.add_argument(
        "--instances",
        type=_positive(int),
        default=1,
        help="budget: trn2.48xlarge instances (64 NeuronCores each)",
    )
    p.add_argument(
        "--sim-profile",
        choices=sorted(layouts.profile_names()),
        default=DEFAULT_FAMILY,
        help="timing profile, or a family whose -tp32/-tp64 members give each TP degree",
    )
    p.add_argument("--results-dir", type=Path, default=Path("plan"))
    p.add_argument(
        "--quick", action="store_true", help=f"{QUICK_REQUESTS} requests, batches 1, 4 and 16"
    )
    p.add_argument("--json", action="store_true", help="print the plan as JSON on stdout")
    p.add_argument("--model-path", default=DEFAULT_MODEL_PATH, help="for the printed commands")
    p.add_argument("--seed", type=int, default=11111, help="request sizes and arrivals")
    p.set_defaults(func=run)


class _Progress:
    """`[i/n] layout` on one terminal line; silent when stderr is not a TTY."""

    def __init__(self, total: int, stream: TextIO) -> None:
        self.total, self.done, self.stream = total, 0, stream
        self.enabled = stream.isatty()

    def __call__(self, outcome: sweep.Outcome) -> None:
        self.done += 1
        if self.enabled:
            self.stream.write(f"\r\x1b[K[{self.done}/{self.total}] {outcome.layout.name}")
            self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.done:
            self.stream.write("\n")


def run(args: argparse.Namespace) -> int:
    try:
        profiles = layouts.family_profiles(args.sim_profile)
        count = args.max_num_completed_requests or (QUICK_REQUESTS if args.quick else REQUESTS)
        if args.replay is not None:
            specs = workload.replayed(args.replay)[:count]
        else:
            specs = workload.drawn(
                count,
                args.mean_input_tokens,
                args.stddev_input_tokens,
                args.mean_output_tokens,
                args.stddev_output_tokens,
                args.seed,
            )
    except (ValueError, workload.WorkloadError) as exc:
        print(f"di-router plan: {exc}", file=sys.stderr)
        return 2
    rate = None if args.concurrency else (args.request_rate or 1.0)
    load = Load(request_rate=rate, concurrency=args.concurrency, seed=args.seed)
    slo = sweep.SLO(args.ttft_p99, args.itl_p99)
    batches = layouts.QUICK_BATCHES if args.quick else layouts.BATCHES
    candidates = layouts.candidates(args.instances, sorted(profiles), batches)
    progress = _Progress(len(candidates), sys.stderr)
    started = time.perf_counter()
    try:
        outcomes = sweep.sweep(candidates, profiles, specs, load, slo, progress)
    finally:
        progress.close()
    elapsed = time.perf_counter() - started
    winner = sweep.recommend(outcomes)
    reason = sweep.why(winner, outcomes, slo)
    lines = commands.commands(winner.layout, args.model_path)
    described = _workload(args, load, len(specs))
    plan = report.plan_dict(outcomes, winner, reason, lines, slo, described)
    plan["sweep_seconds"] = elapsed
    out = args.results_dir
    bench_report.write_json(out / "plan.json", plan)
    plot = _plot(outcomes, winner, out, described["title"], slo)
    text = _markdown(outcomes, winner, reason, lines, described["title"], plot, elapsed)
    (out / "plan.md").write_text(text)
    if args.json:
        sys.stdout.write(json.dumps(plan) + "\n")
    else:
        print(text, end="")
        written = [out / "plan.md", out / "plan.json"] + ([out / plot] if plot else [])
        print("\nwritten: " + ", ".join(map(str, written)))
    return 0


def _workload(args: argparse.Namespace, load: Load, count: int) -> dict[str, Any]:
    if args.replay is not None:
        sizes = f"sizes replayed from {args.replay}"
    else:
        sizes = (
            f"{args.mean_input_tokens} +/- {args.stddev_input_tokens:g} input, "
            f"{args.mean_output_tokens} +/- {args.stddev_output_tokens:g} output tokens"
        )
    offered = (
        f"{load.request_rate:g} req/s (Poisson)"
        if load.request_rate is not None
        else f"concurrency {load.concurrency}"
    )
    budget = f"{args.instances} x trn2.48xlarge"
    return {
        "title": f"{sizes}, {offered}, {count} requests, {budget}, profile {args.sim_profile}",
        "request_rate": load.request_rate,
        "concurrency": load.concurrency,
        "requests": count,
        "instances": args.instances,
        "sim_profile": args.sim_profile,
        "seed": args.seed,
        "replay": str(args.replay) if args.replay else None,
    }


def _plot(
    outcomes: list[sweep.Outcome], winner: sweep.Outcome, out: Path, title: str, slo: sweep.SLO
) -> str | None:
    if importlib.util.find_spec("matplotlib") is None:
        print("di-router plan: no plot (pip install 'di-router[bench]')", file=sys.stderr)
        return None
    from di_router.plan.plot import pareto_png

    return pareto_png(outcomes, winner, out / "pareto.png", title, slo.ttft_s).name


def _markdown(
    outcomes: list[sweep.Outcome],
    winner: sweep.Outcome,
    reason: str,
    lines: list[str],
    title: str,
    plot: str | None,
    elapsed: float,
) -> str:
    parts = [
        f"# di-router plan: {title}",
        "",
        f"{len(outcomes)} layouts simulated in {elapsed:.1f} s (virtual time).",
        "ITL: a request's mean gap after its first token (the bench's headline); "
        "max gap p99: the pooled gaps' p99, where prefill stalls show.",
        "",
        report.table(outcomes),
        "",
        f"**Recommended: {winner.layout.name}.** {reason}",
        "",
        "```bash",
        *lines,
        "```",
    ]
    if plot:
        parts += ["", f"![goodput per instance against p99 TTFT]({plot})"]
    return "\n".join(parts) + "\n"
