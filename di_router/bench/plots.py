"""PNG plots of a DI-vs-baseline comparison (matplotlib, Agg backend: no display needed).

matplotlib is an optional dependency (`pip install 'di-router[bench]'`); `compare_cmd` writes
the report without plots when it is missing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt

from di_router.bench.compare_report import Comparison
from di_router.bench.loadgen import RequestResult
from di_router.bench.runner import BenchResult

COLORS = {"baseline": "tab:orange", "di": "tab:blue"}
LABELS = {"baseline": "baseline (colocated)", "di": "DI (router, 1P1D)"}
TRACES = 3


def focus_concurrency(concurrencies: Sequence[int]) -> int:
    """The distributions are drawn at one concurrency: the tutorial's 4 if run, else the top."""
    return 4 if 4 in concurrencies else max(concurrencies)


def write_all(cmp: Comparison, out_dir: Path) -> list[str]:
    """Every plot into `out_dir`; returns the file names, in the report's order."""
    c = focus_concurrency(cmp.concurrencies)
    base, di = cmp.pair(c)
    names = [
        _cdf(out_dir, "ttft_cdf.png", f"TTFT at concurrency {c}", "TTFT (ms)", base, di, _ttfts),
        _cdf(out_dir, "itl_cdf.png", f"ITL at concurrency {c}", "gap (ms)", base, di, _gaps),
        _over_time(out_dir, c, base, di),
    ]
    if len(cmp.concurrencies) > 1:
        names.append(_sweep(out_dir, cmp))
    return names


def _ttfts(result: BenchResult) -> list[float]:
    return [r.ttft * 1e3 for r in result.run.results if r.ok and r.ttft is not None]


def _gaps(result: BenchResult) -> list[float]:
    return [g * 1e3 for r in result.run.results if r.ok for g in r.gaps]


def _cdf(
    out_dir: Path,
    name: str,
    title: str,
    xlabel: str,
    base: BenchResult,
    di: BenchResult,
    values: Callable[[BenchResult], list[float]],
) -> str:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for side, result in (("baseline", base), ("di", di)):
        data = sorted(values(result))
        if data:
            ys = [(i + 1) / len(data) for i in range(len(data))]
            ax.step(data, ys, where="post", color=COLORS[side], label=LABELS[side])
    ax.set(title=title, xlabel=xlabel, ylabel="fraction of samples", ylim=(0, 1.02))
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    return _save(fig, out_dir, name)


def _traced(result: BenchResult) -> list[RequestResult]:
    """A few complete requests from the middle of the run (past the start-up transient)."""
    good = [r for r in result.run.results if r.ok and len(r.token_times) > 1]
    start = len(good) // 2
    return good[start : start + TRACES]


def _over_time(out_dir: Path, c: int, base: BenchResult, di: BenchResult) -> str:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    for ax, (side, result) in zip(axes, (("baseline", base), ("di", di)), strict=True):
        for i, r in enumerate(_traced(result)):
            times = [t - r.send_time for t in r.token_times[1:]]
            gaps = [g * 1e3 for g in r.gaps]
            ax.plot(times, gaps, marker=".", markersize=3, linewidth=0.8, label=f"request {i + 1}")
        ax.set(title=LABELS[side], xlabel="time since request sent (s)")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper right", fontsize="small")
    axes[0].set_ylabel("gap before each token (ms)")
    fig.suptitle(f"Inter-token gaps over time at concurrency {c} (spikes: other prefills)")
    return _save(fig, out_dir, "itl_over_time.png")


def _sweep(out_dir: Path, cmp: Comparison) -> str:
    panels: list[tuple[str, Callable[[Any], float], bool]] = [
        ("TTFT p50 (ms)", lambda s: s.ttft_s.p50 * 1e3, False),
        ("TTFT p99 (ms)", lambda s: s.ttft_s.p99 * 1e3, False),
        ("ITL p50 (ms)", lambda s: s.itl_s.p50 * 1e3, False),
        ("ITL p99 (ms)", lambda s: s.itl_s.p99 * 1e3, False),
        ("completed req/min", lambda s: s.requests_per_minute, True),
    ]
    cs = cmp.concurrencies
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4))
    for ax, (title, metric, is_rate) in zip(axes, panels, strict=True):
        for side in ("baseline", "di"):
            ys = [metric(cmp.runs[side][c].stats) for c in cs]
            ax.plot(cs, ys, marker="o", color=COLORS[side], label=LABELS[side])
            if is_rate and side == "baseline":
                scaled = [cmp.factor * y for y in ys]
                label = f"baseline x{cmp.factor:g} (hardware parity)"
                ax.plot(cs, scaled, marker="o", linestyle="--", color=COLORS[side], label=label)
        ax.set(title=title, xlabel="concurrency", xscale="log")
        ax.minorticks_off()
        ax.set_xticks(cs, [str(c) for c in cs])
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize="small")
    fig.suptitle("DI vs baseline across concurrency")
    return _save(fig, out_dir, "sweep.png")


def _save(fig: Any, out_dir: Path, name: str) -> str:
    out_dir.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out_dir / name, dpi=110)
    plt.close(fig)
    return name
