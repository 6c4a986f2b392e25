"""Simulate every candidate layout on one workload and pick the one to deploy.

Goodput is DistServe's: completed requests per second that met both SLOs (TTFT at most
`ttft_slo`, the request's inter-token latency at most `itl_slo`; an SLO left out is always met).
The ITL is the bench's headline one (Neuron's llmperf patch: a request's mean gap after its first
token). The winner is the layout meeting both SLOs at p99 with the most goodput per instance;
within 2 % of that, the one with the lowest p99 TTFT. Nothing meets them: the most goodput per
instance anyway, and the report says so.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from di_router.bench.loadgen import RequestSpec, Summary
from di_router.plan.layouts import Layout
from di_router.plan.simulate import Load, simulate
from di_router.sim.profiles import TimingProfile

TIE = 0.02


@dataclass(frozen=True)
class SLO:
    ttft_s: float | None = None
    itl_s: float | None = None


@dataclass(frozen=True)
class Outcome:
    layout: Layout
    summary: Summary
    goodput: float
    """Requests per second that met both SLOs."""
    meets_slo: bool
    """p99 TTFT and p99 ITL within their SLOs."""

    @property
    def goodput_per_instance(self) -> float:
        return self.goodput / self.layout.instances

    @property
    def throughput(self) -> float:
        return self.summary.requests_per_minute / 60.0


def evaluate(
    layout: Layout,
    profile: TimingProfile,
    specs: Sequence[RequestSpec],
    load: Load,
    slo: SLO,
) -> Outcome:
    run = simulate(layout, profile, specs, load)
    summary = run.summary()
    good = sum(
        1
        for r in run.results
        if r.ok
        and _within(r.ttft, slo.ttft_s)
        and _within(r.neuron_itl if r.output_tokens > 1 else 0.0, slo.itl_s)
    )
    goodput = good / run.duration_s if run.duration_s > 0 else math.nan
    meets = _within(summary.ttft_s.p99, slo.ttft_s) and _within(
        summary.itl_neuron_s.p99 if summary.itl_neuron_s.count else 0.0, slo.itl_s
    )
    return Outcome(layout, summary, goodput, meets)


def _within(value: float | None, limit: float | None) -> bool:
    return limit is None or (value is not None and value <= limit)


def sweep(
    layouts: Sequence[Layout],
    profiles: dict[int, TimingProfile],
    specs: Sequence[RequestSpec],
    load: Load,
    slo: SLO,
    on_outcome: Callable[[Outcome], None] | None = None,
) -> list[Outcome]:
    outcomes = []
    for layout in layouts:
        outcome = evaluate(layout, profiles[layout.tp], specs, load, slo)
        outcomes.append(outcome)
        if on_outcome is not None:
            on_outcome(outcome)
    return outcomes


def recommend(outcomes: Sequence[Outcome]) -> Outcome:
    pool = [o for o in outcomes if o.meets_slo] or list(outcomes)
    best = max(o.goodput_per_instance for o in pool)
    close = [o for o in pool if o.goodput_per_instance >= best * (1 - TIE)]
    return min(close, key=lambda o: (o.summary.ttft_s.p99, o.layout.server_count))


def pareto(outcomes: Sequence[Outcome]) -> list[Outcome]:
    """Layouts no other beats on both goodput per instance (higher) and p99 TTFT (lower)."""
    return [
        o
        for o in outcomes
        if not any(
            p.goodput_per_instance >= o.goodput_per_instance
            and p.summary.ttft_s.p99 <= o.summary.ttft_s.p99
            and (
                p.goodput_per_instance > o.goodput_per_instance
                or p.summary.ttft_s.p99 < o.summary.ttft_s.p99
            )
            for p in outcomes
        )
    ]


def why(winner: Outcome, outcomes: Sequence[Outcome], slo: SLO) -> str:
    """One sentence: what the winner achieves and what it beat."""
    s = winner.summary
    met = [o for o in outcomes if o.meets_slo]
    latency = f"p99 TTFT {s.ttft_s.p99:.2f} s, p99 ITL {1e3 * s.itl_neuron_s.p99:.1f} ms"
    if not met:
        return (
            f"No layout meets the SLOs at this load; {winner.layout.name} comes closest with the "
            f"most goodput per instance ({winner.goodput_per_instance:.2f} req/s, {latency})."
        )
    runner_up = max(
        (o for o in met if o is not winner), key=lambda o: o.goodput_per_instance, default=None
    )
    tail = ""
    if runner_up is not None:
        tail = (
            f"; the next best, {runner_up.layout.name}, gives "
            f"{runner_up.goodput_per_instance:.2f} with p99 TTFT "
            f"{runner_up.summary.ttft_s.p99:.2f} s"
        )
    return (
        f"{winner.layout.name} meets both SLOs ({latency}) with "
        f"{winner.goodput_per_instance:.2f} req/s of goodput per instance, "
        f"{len(met)} of {len(outcomes)} layouts meet them{tail}."
    )
