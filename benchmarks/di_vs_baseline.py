"""DI (1P1D + router) vs one colocated server: the Neuron DI tutorial's comparison, simulated.

Single-instance 1P1D on a trn2.48xlarge: prefill on cores 0-31 and decode on cores 32-63 (TP32
each), against one TP32 baseline server with continuous batching. llmperf's workload from the
tutorial: chat, 1024 input tokens, 100 +- 10 output tokens, concurrency 4, top_k 50 / top_p 0.9 /
temperature 0.7, batch 4. The baseline uses half the hardware, so the tutorial says to double
its throughput before comparing.

    python benchmarks/di_vs_baseline.py [--requests 200]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

from di_router.bench import loadgen, report, stack

RESULTS = Path(__file__).parent / "results" / "di_vs_baseline.json"
PROFILE = "trn2-llama3.3-70b-tp32"


async def measure(url: str, args: argparse.Namespace) -> loadgen.Summary:
    config = loadgen.LoadConfig(
        url, concurrency=args.concurrency, sampling=loadgen.TUTORIAL_SAMPLING
    )
    specs = loadgen.make_requests(
        args.requests, args.input_tokens, args.output_mean, args.output_sd, seed=args.seed
    )
    async with loadgen.make_client(config) as client:
        # Connections only: one tiny request per worker, so pooled sockets exist before t0.
        await loadgen.warm_up(config, loadgen.RequestSpec("hi", 1), client)
        run = await loadgen.run_load(config, specs, client)
    return run.summary()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=40, help="the tutorial uses 200")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--batch", type=int, default=4, help="--max-num-seqs of every server")
    p.add_argument("--input-tokens", type=int, default=1024)
    p.add_argument("--output-mean", type=int, default=100)
    p.add_argument("--output-sd", type=float, default=10.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", default=PROFILE)
    p.add_argument("--output", type=Path, default=RESULTS)
    args = p.parse_args(argv)

    # One after the other: the two setups never compete for this machine's cores.
    with stack.baseline(args.profile, args.batch) as base:
        baseline = asyncio.run(measure(base.url, args))
    with stack.di(args.profile, args.batch) as di:
        disagg = asyncio.run(measure(di.url, args))

    def row(name: str, s: loadgen.Summary, scale: float = 1.0) -> list[object]:
        """`scale` multiplies throughput only: the x2 baseline stands for two servers."""
        return [
            name,
            s.completed,
            s.errors,
            report.ms(s.ttft_s.p50),
            report.ms(s.ttft_s.p99),
            report.ms(s.itl_s.p50),
            report.ms(s.itl_s.p99),
            report.ms(s.itl_neuron_s.p50),
            s.e2e_s.p50,
            s.e2e_s.p99,
            scale * s.output_throughput_tok_s,
            scale * s.requests_per_minute,
        ]

    def ratio_row(name: str, scale: float) -> list[object]:
        di_row, base_row = row("", disagg), row("", baseline, scale)
        pairs = zip(di_row[3:], base_row[3:], strict=True)
        return [name, "", "", *(report.ratio(x, y) for x, y in pairs)]

    rows = [
        row("baseline TP32", baseline),
        row("baseline x2 (hardware parity)", baseline, 2.0),
        row("DI 1P1D TP32+TP32", disagg),
        ratio_row("**DI / baseline**", 1.0),
        ratio_row("**DI / baseline x2**", 2.0),
    ]
    print(
        f"DI vs baseline on {args.profile}, batch {args.batch}: chat, {args.input_tokens} in, "
        f"{args.output_mean}+-{args.output_sd:g} out, concurrency {args.concurrency}, "
        f"{args.requests} requests\n"
    )
    print(
        report.markdown_table(
            [
                "setup",
                "ok",
                "err",
                "TTFT p50 ms",
                "TTFT p99 ms",
                "ITL p50 ms",
                "ITL p99 ms",
                "Neuron ITL p50 ms",
                "E2E p50 s",
                "E2E p99 s",
                "out tok/s",
                "req/min",
            ],
            rows,
        )
    )
    data: dict[str, Any] = {
        "benchmark": "di_vs_baseline",
        "environment": report.environment(),
        "workload": {
            "profile": args.profile,
            "batch": args.batch,
            "endpoint": "chat",
            "input_tokens": args.input_tokens,
            "output_mean": args.output_mean,
            "output_sd": args.output_sd,
            "seed": args.seed,
            "concurrency": args.concurrency,
            "requests": args.requests,
            "sampling": loadgen.TUTORIAL_SAMPLING,
        },
        "baseline": baseline.to_dict(),
        "di": disagg.to_dict(),
        "ratios_di_over_baseline": {
            "ttft_p50": report.ratio(disagg.ttft_s.p50, baseline.ttft_s.p50),
            "ttft_p99": report.ratio(disagg.ttft_s.p99, baseline.ttft_s.p99),
            "itl_p50": report.ratio(disagg.itl_s.p50, baseline.itl_s.p50),
            "itl_p99": report.ratio(disagg.itl_s.p99, baseline.itl_s.p99),
            "e2e_p50": report.ratio(disagg.e2e_s.p50, baseline.e2e_s.p50),
            "rpm": report.ratio(disagg.requests_per_minute, baseline.requests_per_minute),
            "rpm_vs_doubled_baseline": report.ratio(
                disagg.requests_per_minute, 2 * baseline.requests_per_minute
            ),
        },
    }
    report.write_json(args.output, data)
    print(f"\nwrote {args.output}")
    return 1 if baseline.errors or disagg.errors else 0


if __name__ == "__main__":
    sys.exit(main())
