"""`di-router plan`'s virtual time against the real HTTP stack, at full size (issue 13).

The comparison `tests/plan/test_agreement.py` makes on 16 requests, on 1,000 per layout:
baseline batch 4, 1P1D and 1P2D (Neuron 2.26 workers found through etcd, which must be
installed: Debian's `etcd-server`), each run for real (simulators and router, measured as
`di-router bench` measures) and in virtual time on the same requests and arrivals
(`di_router/plan/agreement.py`). Prints, per layout, virtual against real and the relative error
of TTFT and ITL at p50 and p99 and of completed requests per minute.

    python benchmarks/plan_agreement.py                  # 1,000 requests per layout, ~27 min
    python benchmarks/plan_agreement.py --requests 100   # ~3 min
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the test suite's etcd server

from di_router.bench import runner, stack
from di_router.plan.agreement import Agreement, agreement
from di_router.plan.layouts import Layout
from tests.discovery.conftest import EtcdServer

LAYOUTS = (
    Layout("baseline", 32, 4, servers=1),
    Layout("di", 32, 4, prefills=1, decodes=1),
    Layout("di", 32, 4, prefills=1, decodes=2),
)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--request-rate", type=float, default=2.0, help="Poisson arrivals, req/s")
    p.add_argument("--mean-input-tokens", type=int, default=1024)
    p.add_argument("--mean-output-tokens", type=int, default=20)
    p.add_argument("--stddev-output-tokens", type=float, default=2.0)
    p.add_argument("--sim-profile", default="trn2-llama3.3-70b-tp32")
    args = p.parse_args()
    # The tutorial's prompts (1024 tokens) and its output (100 +/- 10) scaled by 1/5, so that
    # 1,000 requests at 2 req/s keep every layout below saturation and take ~8 min each.
    workload = runner.Workload(
        model=stack.MODEL,
        mean_input_tokens=args.mean_input_tokens,
        stddev_input_tokens=0,
        mean_output_tokens=args.mean_output_tokens,
        stddev_output_tokens=args.stddev_output_tokens,
        max_num_completed_requests=args.requests,
        num_concurrent_requests=args.requests,
        request_rate=args.request_rate,
        endpoint="completions",
        timeout_s=3600,
    )
    etcd = EtcdServer()
    try:
        results = [
            agreement(layout, args.sim_profile, workload, etcd.endpoint) for layout in LAYOUTS
        ]
    finally:
        etcd.close()
    print(table(results, workload, args.sim_profile))
    return 1 if any(result.failures for result in results) else 0


def table(results: list[Agreement], workload: runner.Workload, profile: str) -> str:
    lines = [
        f"{workload.max_num_completed_requests} requests per layout at "
        f"{workload.request_rate} req/s, {workload.mean_input_tokens} input tokens, "
        f"{workload.mean_output_tokens} +/- {workload.stddev_output_tokens:g} output, {profile}",
        "",
        "| layout | metric | virtual | real | error | tolerance |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for result in results:
        for check in result.checks:
            scale, unit = (1.0, "") if check.metric == "req/min" else (1000.0, " ms")
            mark = "" if check.ok else " **over**"
            lines.append(
                f"| {result.layout.name} | {check.metric.replace('_s', '')} "
                f"| {check.virtual * scale:.1f}{unit} | {check.real * scale:.1f}{unit} "
                f"| {100 * check.error:.1f} %{mark} | {check.tolerance:.0%} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
