"""Router overhead: client -> simulator directly vs client -> router -> prefill + decode.

On the `instant` profile the simulator spends no simulated time, so every millisecond measured
is HTTP, JSON and scheduling cost; the router/direct ratios are therefore the worst case of what
the router adds. Also checks the router's memory (RSS) before and after the runs for leaks.

    python benchmarks/router_overhead.py [--requests-c1 200] [--requests-c32 960]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

from di_router.bench import loadgen, report, stack

RESULTS = Path(__file__).parent / "results" / "router_overhead.json"


async def measure(url: str, concurrency: int, requests: int, args: argparse.Namespace) -> Any:
    config = loadgen.LoadConfig(url, concurrency=concurrency, sampling=loadgen.TUTORIAL_SAMPLING)
    specs = loadgen.make_requests(requests, args.input_tokens, args.output_tokens, seed=concurrency)
    async with loadgen.make_client(config) as client:
        await loadgen.warm_up(config, specs[0], client)
        run = await loadgen.run_load(config, specs, client)
    return run.summary()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--input-tokens", type=int, default=64)
    p.add_argument("--output-tokens", type=int, default=32)
    p.add_argument("--requests-c1", type=int, default=200)
    p.add_argument("--requests-c32", type=int, default=960)
    p.add_argument("--output", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    levels = [(1, args.requests_c1), (32, args.requests_c32)]

    results: dict[str, Any] = {}
    router_cpu_ms: dict[int, float] = {}
    with stack.baseline("instant") as direct, stack.di("instant") as di:
        router = di.router
        assert router is not None
        rss_start = stack.rss_bytes(router.pid)
        # Warm the router at the highest concurrency first: its pools, buffers and lazily
        # imported code then count in "before", so before -> after growth points at leaks.
        asyncio.run(measure(di.url, levels[-1][0], 2 * levels[-1][0], args))
        rss_before = stack.rss_bytes(router.pid)
        for concurrency, requests in levels:
            # Interleaved per level, so a noisy neighbour on the shared machine hits both paths.
            results[f"direct_c{concurrency}"] = asyncio.run(
                measure(direct.url, concurrency, requests, args)
            )
            cpu = stack.cpu_seconds(router.pid)
            results[f"router_c{concurrency}"] = asyncio.run(
                measure(di.url, concurrency, requests, args)
            )
            # Includes the warm-up requests (concurrency of them) of this measurement.
            router_cpu_ms[concurrency] = (
                (stack.cpu_seconds(router.pid) - cpu) * 1e3 / (requests + concurrency)
            )
        rss_after = stack.rss_bytes(router.pid)
        # The same load again: steady-state memory stays flat, a leak keeps growing.
        concurrency, requests = levels[-1]
        asyncio.run(measure(di.url, concurrency, requests, args))
        rss_repeat = stack.rss_bytes(router.pid)

    rows = []
    ratios: dict[str, dict[str, float]] = {}
    for concurrency, _ in levels:
        d, r = results[f"direct_c{concurrency}"], results[f"router_c{concurrency}"]
        ratios[f"c{concurrency}"] = {
            "ttft_p50": report.ratio(r.ttft_s.p50, d.ttft_s.p50),
            "ttft_p99": report.ratio(r.ttft_s.p99, d.ttft_s.p99),
            "itl_p50": report.ratio(r.itl_s.p50, d.itl_s.p50),
            "tpot_p50": report.ratio(r.tpot_s.p50, d.tpot_s.p50),
            "throughput": report.ratio(r.output_throughput_tok_s, d.output_throughput_tok_s),
        }
        for name, s in (("direct", d), ("router", r)):
            rows.append(
                [
                    f"{name} c={concurrency}",
                    s.completed,
                    s.errors,
                    report.ms(s.ttft_s.p50),
                    report.ms(s.ttft_s.p99),
                    report.ms(s.itl_s.p50) * 1e3,
                    report.ms(s.tpot_s.p50),
                    s.output_throughput_tok_s,
                    s.requests_per_minute,
                ]
            )
        q = ratios[f"c{concurrency}"]
        rows.append(
            [
                f"**router/direct c={concurrency}**",
                "",
                "",
                q["ttft_p50"],
                q["ttft_p99"],
                q["itl_p50"],
                q["tpot_p50"],
                q["throughput"],
                "",
            ]
        )

    print(
        f"router overhead on the instant profile: chat, {args.input_tokens}-token prompts, "
        f"{args.output_tokens} output tokens\n"
    )
    print(
        report.markdown_table(
            [
                "run",
                "ok",
                "err",
                "TTFT p50 ms",
                "TTFT p99 ms",
                "ITL p50 us",
                "TPOT p50 ms",
                "out tok/s",
                "req/min",
            ],
            rows,
        )
    )
    rss = {
        "start_bytes": rss_start,
        "before_bytes": rss_before,
        "after_bytes": rss_after,
        "after_over_before": report.ratio(rss_after, rss_before),
        "after_repeat_bytes": rss_repeat,
        "repeat_over_after": report.ratio(rss_repeat, rss_after),
        "repeat_requests": levels[-1][1],
    }
    requests_total = sum(n for _, n in levels)
    print(
        f"\nrouter RSS: {rss_start / 2**20:.1f} MiB at start, {rss_before / 2**20:.1f} MiB after "
        f"warm-up, {rss_after / 2**20:.1f} MiB after {requests_total} requests "
        f"(x{rss['after_over_before']:.3f}), {rss_repeat / 2**20:.1f} MiB after "
        f"{levels[-1][1]} more at c={levels[-1][0]} (x{rss['repeat_over_after']:.3f})"
    )
    for concurrency, cpu_ms in router_cpu_ms.items():
        print(f"router CPU per request at c={concurrency}: {cpu_ms:.2f} ms")
    report.write_json(
        args.output,
        {
            "benchmark": "router_overhead",
            "environment": report.environment(),
            "workload": {
                "profile": "instant",
                "endpoint": "chat",
                "input_tokens": args.input_tokens,
                "output_tokens": args.output_tokens,
                "sampling": loadgen.TUTORIAL_SAMPLING,
                "levels": [{"concurrency": c, "requests": n} for c, n in levels],
            },
            "results": {name: s.to_dict() for name, s in results.items()},
            "ratios_router_over_direct": ratios,
            "router_rss": rss,
            "router_cpu_ms_per_request": {f"c{c}": v for c, v in router_cpu_ms.items()},
        },
    )
    print(f"wrote {args.output}")
    failed = sum(s.errors for s in results.values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
