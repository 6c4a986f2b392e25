"""The plan's Pareto plot: goodput per instance against p99 TTFT, one point per layout (PNG).

matplotlib is optional (`pip install 'di-router[bench]'`); the CLI writes the rest without it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt

from di_router.plan.sweep import Outcome, pareto

STYLE = {"baseline": ("tab:orange", "s", "colocated (baseline)"), "di": ("tab:blue", "o", "DI")}


def pareto_png(
    outcomes: Sequence[Outcome], winner: Outcome, path: Path, title: str, ttft_slo: float | None
) -> Path:
    fig, ax = plt.subplots(figsize=(8, 5))
    for kind, (color, marker, label) in STYLE.items():
        points = [o for o in outcomes if o.layout.kind == kind]
        ax.scatter(
            [o.summary.ttft_s.p99 for o in points],
            [o.goodput_per_instance for o in points],
            c=color,
            marker=marker,
            alpha=0.55,
            label=label,
        )
    front = sorted(pareto(outcomes), key=lambda o: o.summary.ttft_s.p99)
    ax.plot(
        [o.summary.ttft_s.p99 for o in front],
        [o.goodput_per_instance for o in front],
        color="gray",
        linewidth=1,
        label="Pareto front",
    )
    for o in front:
        ax.annotate(o.layout.name, (o.summary.ttft_s.p99, o.goodput_per_instance), fontsize=7)
    ax.scatter(
        [winner.summary.ttft_s.p99],
        [winner.goodput_per_instance],
        s=180,
        facecolors="none",
        edgecolors="red",
        label=f"recommended: {winner.layout.name}",
    )
    if ttft_slo is not None:
        ax.axvline(ttft_slo, color="red", linestyle=":", linewidth=1, label="TTFT SLO")
    ax.set(
        title=title,
        xlabel="p99 TTFT (s, log)",
        ylabel="goodput per trn2.48xlarge (req/s)",
        xscale="log",
    )
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="best")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
