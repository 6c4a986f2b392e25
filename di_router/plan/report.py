"""The plan as text and JSON: every candidate, the recommendation and its commands."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from di_router.bench import report
from di_router.plan.sweep import SLO, Outcome

HEADERS = [
    "layout",
    "instances",
    "meets SLOs",
    "goodput req/s",
    "per instance",
    "TTFT p50 s",
    "TTFT p99 s",
    "ITL p50 ms",
    "ITL p99 ms",
    "max gap p99 ms",
]


def table(outcomes: Sequence[Outcome]) -> str:
    """Best first: SLOs met, then goodput per instance."""
    ordered = sorted(outcomes, key=lambda o: (not o.meets_slo, -o.goodput_per_instance))
    rows = [
        [
            o.layout.name,
            o.layout.instances,
            "yes" if o.meets_slo else "no",
            o.goodput,
            o.goodput_per_instance,
            o.summary.ttft_s.p50,
            o.summary.ttft_s.p99,
            report.ms(o.summary.itl_neuron_s.p50),
            report.ms(o.summary.itl_neuron_s.p99),
            report.ms(o.summary.itl_s.p99),
        ]
        for o in ordered
    ]
    return report.markdown_table(HEADERS, rows, text_columns=3)


def outcome_dict(o: Outcome) -> dict[str, Any]:
    s = o.summary
    return {
        "layout": o.layout.name,
        "kind": o.layout.kind,
        "tp_degree": o.layout.tp,
        "batch": o.layout.batch,
        "servers": o.layout.servers,
        "prefills": o.layout.prefills,
        "decodes": o.layout.decodes,
        "instances": o.layout.instances,
        "neuron_cores": o.layout.cores,
        "meets_slo": o.meets_slo,
        "goodput_req_s": o.goodput,
        "goodput_per_instance_req_s": o.goodput_per_instance,
        "throughput_req_s": o.throughput,
        "ttft_s": {"p50": s.ttft_s.p50, "p99": s.ttft_s.p99},
        "itl_s": {"p50": s.itl_neuron_s.p50, "p99": s.itl_neuron_s.p99},
        "gap_s": {"p50": s.itl_s.p50, "p99": s.itl_s.p99},
        "completed": s.completed,
        "duration_s": s.duration_s,
    }


def plan_dict(
    outcomes: Sequence[Outcome],
    winner: Outcome,
    reason: str,
    commands: list[str],
    slo: SLO,
    workload: dict[str, Any],
) -> dict[str, Any]:
    return {
        "workload": workload,
        "slo": {"ttft_p99_s": slo.ttft_s, "itl_p99_s": slo.itl_s},
        "recommendation": {**outcome_dict(winner), "why": reason, "commands": commands},
        "candidates": [outcome_dict(o) for o in outcomes],
        "environment": report.environment(),
    }
