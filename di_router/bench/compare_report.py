"""The DI-vs-baseline report: a side-by-side table per concurrency and a verdict from the numbers.

Throughput is also shown normalised for hardware: the Neuron DI tutorial runs the baseline on
half the cores DI uses and says to double its throughput before comparing, so the baseline's
req/min and tok/s are multiplied by a factor (2 by default). Latencies are compared as measured.
Differences within `TIE` (relative) are called a tie, so noise does not crown a winner.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from di_router.bench import report
from di_router.bench.runner import BenchResult

TIE = 0.05
SIDES = ("baseline", "di")
HEADERS = (
    "concurrency",
    "setup",
    "ok",
    "err",
    "TTFT p50 ms",
    "TTFT p99 ms",
    "ITL p50 ms",
    "ITL p99 ms",
    "ITL mean ms",
    "E2E p50 s",
    "out tok/s",
    "req/min",
)


@dataclass
class Comparison:
    """Both sides' runs by concurrency, and how they were set up."""

    runs: Mapping[str, Mapping[int, BenchResult]]
    """side ("baseline" | "di") -> concurrency -> run."""
    factor: float
    setup: Mapping[str, str]
    """side -> one line saying what served it (profile and batch, or the URL)."""

    @property
    def concurrencies(self) -> list[int]:
        return sorted(self.runs["di"])

    def pair(self, concurrency: int) -> tuple[BenchResult, BenchResult]:
        return self.runs["baseline"][concurrency], self.runs["di"][concurrency]


def _numbers(result: BenchResult, scale: float = 1.0) -> list[float]:
    """The table's measured columns; `scale` multiplies throughput only."""
    s = result.stats
    return [
        report.ms(s.ttft_s.p50),
        report.ms(s.ttft_s.p99),
        report.ms(s.itl_s.p50),
        report.ms(s.itl_s.p99),
        report.ms(result.summary["results_inter_token_latency_s_mean"]),
        s.e2e_s.p50,
        scale * s.output_throughput_tok_s,
        scale * s.requests_per_minute,
    ]


def table(cmp: Comparison) -> str:
    rows: list[list[object]] = []
    for c in cmp.concurrencies:
        base, di = cmp.pair(c)
        parity = f"baseline x{cmp.factor:g} (hardware parity)"
        ratios = [
            report.ratio(x, y)
            for x, y in zip(_numbers(di), _numbers(base, cmp.factor), strict=True)
        ]
        rows += [
            [c, "baseline", base.stats.completed, base.stats.errors, *_numbers(base)],
            [c, parity, "", "", *_numbers(base, cmp.factor)],
            [c, "DI (router, 1P1D)", di.stats.completed, di.stats.errors, *_numbers(di)],
            [c, f"**DI / baseline** (throughput: / x{cmp.factor:g})", "", "", *ratios],
        ]
    return report.markdown_table(HEADERS, rows, text_columns=2)


def _judge(di: float, base: float) -> str:
    """'di', 'baseline' or 'tie' for a lower-is-better metric."""
    if math.isnan(di) or math.isnan(base):
        return "unknown"
    if abs(di - base) <= TIE * max(abs(base), abs(di)):
        return "tie"
    return "di" if di < base else "baseline"


def _phrase(metric: str, winner: str, detail: str) -> str:
    if winner == "tie":
        return f"{metric} is a tie ({detail})"
    if winner == "unknown":
        return f"{metric} cannot be compared ({detail})"
    side = "DI" if winner == "di" else "the baseline"
    return f"{side} wins on {metric} ({detail})"


def verdict(cmp: Comparison, concurrency: int) -> str:
    """One sentence: who wins on TTFT (p50), ITL and throughput (req/min against the
    hardware-normalised baseline). ITL is judged twice, on the p99 of the pooled gaps (where
    prefill stalls show) and on the per-request headline mean (where a long wait after the
    first token shows), and the sentence says so when the two disagree."""
    base, di = cmp.pair(concurrency)
    b, d = base.stats, di.stats
    ttft = _phrase(
        "TTFT",
        _judge(d.ttft_s.p50, b.ttft_s.p50),
        f"p50: DI {_ms(d.ttft_s.p50)}, baseline {_ms(b.ttft_s.p50)}",
    )
    mean_key = "results_inter_token_latency_s_mean"
    d_mean, b_mean = float(di.summary[mean_key]), float(base.summary[mean_key])
    tail = _judge(d.itl_s.p99, b.itl_s.p99)
    mean = _judge(d_mean, b_mean)
    tail_detail = f"p99 of the gaps: DI {_ms(d.itl_s.p99)}, baseline {_ms(b.itl_s.p99)}"
    mean_detail = f"{di.workload.itl_definition} mean: DI {_ms(d_mean)}, baseline {_ms(b_mean)}"
    if tail == mean:
        itl = _phrase("ITL", tail, f"{tail_detail}; {mean_detail}")
    else:
        itl = (
            f"ITL is split ({_side(tail)} on the tail, {tail_detail}; "
            f"{_side(mean)} on the mean, {mean_detail})"
        )
    base_rpm = cmp.factor * b.requests_per_minute
    # Higher is better: judge the negated rates.
    throughput = _phrase(
        "throughput",
        _judge(-d.requests_per_minute, -base_rpm),
        f"DI {d.requests_per_minute:.1f} req/min, baseline x{cmp.factor:g} {base_rpm:.1f}",
    )
    sentence = f"At concurrency {concurrency}, {ttft}, {itl}, and {throughput}."
    if b.errors or d.errors:
        sentence += f" Errors: {d.errors} on DI, {b.errors} on the baseline."
    return sentence


def _side(winner: str) -> str:
    return {"di": "DI wins", "baseline": "the baseline wins"}.get(winner, f"a {winner}")


def _ms(seconds: float) -> str:
    return f"{report.fmt(report.ms(seconds))} ms"


def markdown(
    cmp: Comparison, plots: Sequence[str], environment: Mapping[str, Any], command: str
) -> str:
    """The whole report; `plots` are file names next to it."""
    any_run = next(iter(cmp.runs["di"].values()))
    w = any_run.workload
    lines = [
        "# DI vs baseline",
        "",
        f"`{command}`",
        "",
        f"Workload (llmperf's): {w.endpoint}, {w.mean_input_tokens} input tokens "
        f"(sd {w.stddev_input_tokens:g}), {w.mean_output_tokens} +/- {w.stddev_output_tokens:g} "
        f"output tokens (exact, `ignore_eos`), {w.max_num_completed_requests} requests per run, "
        f"sampling {dict(w.sampling)}, "
        + (f"Poisson arrivals at {w.request_rate:g}/s, " if w.request_rate else "closed loop, ")
        + f"seed {w.seed}.",
        "",
        *(f"- {side}: {cmp.setup[side]}" for side in SIDES),
        f"- measured {environment['date']} on {environment['platform']}, "
        f"{environment['cpus']} CPUs",
        "",
        "ITL p50/p99 are over the pooled gaps between tokens (vLLM bench), where prefill stalls "
        f"show; ITL mean is the headline definition ({w.itl_definition}), per request. The "
        f"baseline x{cmp.factor:g} row multiplies throughput only.",
        "",
        table(cmp),
        "",
        "## Verdict",
        "",
        *(f"- {verdict(cmp, c)}" for c in cmp.concurrencies),
    ]
    if plots:
        lines += ["", "## Plots", ""]
        lines += [f"![{name}]({name})" for name in plots]
    return "\n".join(lines) + "\n"
