"""One llmperf-style benchmark run against one server: workload, load, llmperf files, a table.

`di-router bench` is one call of `execute`; `di-router bench compare` calls it per side and
per concurrency, so both report the same numbers the same way.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from di_router.bench import llmperf_results, loadgen, prompts, report
from di_router.bench.llmperf_results import ItlDefinition, RunInfo
from di_router.bench.progress import Progress
from di_router.bench.tokenizer import Tokenizer

READ_TIMEOUT_S = 180.0  # llmperf's per-request `requests` timeout


@dataclass(frozen=True)
class Workload:
    """llmperf's flags (same names, same defaults) plus the few this tool adds."""

    model: str
    mean_input_tokens: int = 550
    stddev_input_tokens: float = 150
    mean_output_tokens: int = 150
    stddev_output_tokens: float = 80
    max_num_completed_requests: int = 10
    num_concurrent_requests: int = 10
    timeout_s: float = 90
    """Whole-run budget: no request is sent after it (llmperf's `--timeout`)."""
    sampling: Mapping[str, Any] = field(default_factory=dict)
    endpoint: loadgen.Endpoint = "chat"
    request_rate: float | None = None
    seed: int = 11111  # llmperf seeds its prompts with random.seed(11111)
    itl_definition: ItlDefinition = "neuron"
    api_key: str = "EMPTY"


@dataclass
class BenchResult:
    """A finished run: the traces, llmperf's summary and records, and the vLLM-style summary."""

    workload: Workload
    specs: list[loadgen.RequestSpec]
    run: loadgen.LoadRun
    summary: dict[str, Any]
    records: list[dict[str, Any]]
    stats: loadgen.Summary


def execute(
    workload: Workload,
    tokenizer: Tokenizer,
    base_url: str,
    results_dir: Path | None = None,
    label: str = "",
) -> BenchResult:
    """Draw the requests, run them against `base_url` (`;`-separated for several servers),
    and write llmperf's two files into `results_dir` when given."""
    specs = prompts.llmperf_requests(
        tokenizer,
        workload.max_num_completed_requests,
        workload.mean_input_tokens,
        workload.stddev_input_tokens,
        workload.mean_output_tokens,
        workload.stddev_output_tokens,
        workload.seed,
    )
    config = loadgen.LoadConfig(
        base_url,
        model=workload.model,
        endpoint=workload.endpoint,
        concurrency=workload.num_concurrent_requests,
        sampling=workload.sampling,
        timeout_s=READ_TIMEOUT_S,
        api_key=workload.api_key,
        request_rate=workload.request_rate,
        arrival_seed=workload.seed,
        stop_after_s=workload.timeout_s,
    )
    progress = Progress(len(specs), label)
    try:
        run = asyncio.run(loadgen.run_load(config, specs, on_result=progress))
    finally:
        progress.close()
    info = RunInfo(
        model=workload.model,
        mean_input_tokens=workload.mean_input_tokens,
        stddev_input_tokens=workload.stddev_input_tokens,
        mean_output_tokens=workload.mean_output_tokens,
        stddev_output_tokens=workload.stddev_output_tokens,
        num_concurrent_requests=workload.num_concurrent_requests,
        additional_sampling_params=workload.sampling,
        itl_definition=workload.itl_definition,
        endpoint=workload.endpoint,
        request_rate=workload.request_rate,
        tokenizer=tokenizer.name,
    )
    summary, records = llmperf_results.summarize(info, run, specs)
    if results_dir is not None:
        llmperf_results.write(results_dir, summary, records)
    return BenchResult(workload, specs, run, summary, records, run.summary())


def table(result: BenchResult) -> str:
    """The run at a glance: latency distributions in ms, then counts, rates and errors."""
    s = result.stats
    itl = "results_inter_token_latency_s"
    headline = [result.summary[f"{itl}_{k}"] for k in ("mean", "quantiles_p50", "quantiles_p90")]
    headline += [result.summary[f"{itl}_quantiles_p99"], result.summary[f"{itl}_max"]]
    rows: list[list[object]] = [
        _row("TTFT ms", s.ttft_s, 1e3),
        [f"ITL ms ({result.workload.itl_definition}, headline)", *(1e3 * v for v in headline)],
        _row("ITL ms (vLLM, pooled gaps)", s.itl_s, 1e3),
        _row("TPOT ms (vLLM)", s.tpot_s, 1e3),
        _row("E2E s", s.e2e_s, 1.0),
    ]
    lines = [
        report.markdown_table(["metric", "mean", "p50", "p90", "p99", "max"], rows),
        "",
        f"completed {s.completed} of {s.requests}, errors {s.errors}, "
        f"{s.requests_per_minute:.1f} req/min, {s.output_throughput_tok_s:.1f} output tok/s, "
        f"{s.duration_s:.1f} s",
    ]
    if s.errors:
        codes = ", ".join(f"{code}: {n}" for code, n in s.error_codes.items())
        lines.append(f"errors by code: {codes}; " + "; ".join(s.error_messages[:3]))
    return "\n".join(lines)


def _row(name: str, stats: loadgen.Stats, scale: float) -> list[object]:
    return [name, *(scale * v for v in (stats.mean, stats.p50, stats.p90, stats.p99, stats.max))]
