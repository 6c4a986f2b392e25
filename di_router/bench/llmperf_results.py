"""llmperf's result files and summary lines, from the load generator's traces.

File names, keys and printed lines are llmperf's (`token_benchmark_ray.py`, `common_metrics.py`),
so scripts written for llmperf read them unchanged: `<model>_<in>_<out>_summary.json` holds the
flattened summary (`results_ttft_s_quantiles_p50`, `results_num_completed_requests_per_min`, ...)
and `<model>_<in>_<out>_individual_responses.json` one record per request. vLLM bench's
definitions sit beside them under `vllm_*` keys, and the per-request records carry all three
inter-token latencies and the token arrival times, so no definition has to be re-measured.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import orjson

from di_router.bench import report
from di_router.bench.loadgen import LoadRun, RequestResult, RequestSpec, Stats, failure_code

ItlDefinition = Literal["llmperf", "neuron", "vllm"]
ITL_DEFINITIONS: tuple[ItlDefinition, ...] = ("llmperf", "neuron", "vllm")
RESULTS_VERSION = "2023-08-31"  # llmperf's results format version
QUANTILES = ("p25", "p50", "p75", "p90", "p95", "p99")
METRICS = (
    "inter_token_latency_s",
    "ttft_s",
    "end_to_end_latency_s",
    "request_output_throughput_token_per_s",
    "number_input_tokens",
    "number_output_tokens",
)


@dataclass(frozen=True)
class RunInfo:
    """What llmperf records about a run besides its results (its `metadata`)."""

    model: str
    mean_input_tokens: int
    stddev_input_tokens: float
    mean_output_tokens: int
    stddev_output_tokens: float
    num_concurrent_requests: int
    additional_sampling_params: Mapping[str, Any]
    itl_definition: ItlDefinition = "neuron"
    endpoint: str = "chat"
    request_rate: float | None = None
    tokenizer: str = "simulator"


def file_stem(model: str, mean_input_tokens: int, mean_output_tokens: int) -> str:
    """llmperf's `<model>_<in>_<out>` with every run of other characters turned into one `-`."""
    stem = re.sub(r"[^\w\d-]+", "-", f"{model}_{mean_input_tokens}_{mean_output_tokens}")
    return re.sub(r"-{2,}", "-", stem)


def headline_itl(result: RequestResult, definition: ItlDefinition) -> float | None:
    """One request's inter-token latency; for vLLM's pooled definition, its mean gap."""
    if definition == "llmperf":
        return result.llmperf_itl
    if definition == "neuron":
        return result.neuron_itl
    gaps = result.gaps
    return sum(gaps) / len(gaps) if gaps else None


def individual_response(
    result: RequestResult, spec: RequestSpec, definition: ItlDefinition
) -> dict[str, Any]:
    """llmperf's per-request record (zeros where it has zeros), plus our extra keys."""
    e2e = result.e2e or 0.0
    tokens = result.output_tokens if result.ok else len(result.token_times)
    input_tokens = spec.input_tokens or 0
    return {
        "error_code": None if result.ok else failure_code(result),
        "error_msg": "" if result.ok else result.error or f"HTTP {result.status}, no token",
        "inter_token_latency_s": headline_itl(result, definition) or 0.0,
        "ttft_s": result.ttft or 0.0,
        "end_to_end_latency_s": e2e,
        "request_output_throughput_token_per_s": tokens / e2e if e2e > 0 else 0.0,
        "number_total_tokens": input_tokens + tokens,
        "number_output_tokens": tokens,
        "number_input_tokens": input_tokens,
        "llmperf_inter_token_latency_s": result.llmperf_itl,
        "neuron_inter_token_latency_s": result.neuron_itl,
        "vllm_tpot_s": result.tpot,
        "server": result.url,
        "server_prompt_tokens": result.prompt_tokens,
        "token_arrival_s": [t - result.send_time for t in result.token_times],
    }


def summarize(
    info: RunInfo, run: LoadRun, specs: Sequence[RequestSpec]
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(llmperf's flattened summary, its individual responses) for one run."""
    records = [individual_response(r, specs[r.index], info.itl_definition) for r in run.results]
    good = [rec for rec, r in zip(records, run.results, strict=True) if r.ok]
    summary: dict[str, Any] = {
        "version": RESULTS_VERSION,
        "name": file_stem(info.model, info.mean_input_tokens, info.mean_output_tokens) + "_summary",
        "model": info.model,
        "mean_input_tokens": info.mean_input_tokens,
        "stddev_input_tokens": info.stddev_input_tokens,
        "mean_output_tokens": info.mean_output_tokens,
        "stddev_output_tokens": info.stddev_output_tokens,
        "num_concurrent_requests": info.num_concurrent_requests,
        # llmperf flattens nested dicts with "_": additional_sampling_params_top_k, ...
        **{
            f"additional_sampling_params_{k}": v for k, v in info.additional_sampling_params.items()
        },
        "itl_definition": info.itl_definition,
        "endpoint": info.endpoint,
        "request_rate": info.request_rate,
        "tokenizer": info.tokenizer,
    }
    for metric in METRICS:
        if metric == "inter_token_latency_s" and info.itl_definition == "vllm":
            stats = Stats.of(gap for r in run.results if r.ok for gap in r.gaps)
        else:
            stats = Stats.of(float(rec[metric]) for rec in good)
        summary.update(_stats_keys(f"results_{metric}", stats))
    started = len(run.results)
    errors = started - len(good)
    duration = run.duration_s
    codes = [rec["error_code"] for rec in records if rec["error_code"] is not None]
    summary.update(
        {
            "results_num_requests_started": started,
            "results_error_rate": errors / started if started else 0.0,
            "results_number_errors": errors,
            "results_error_code_frequency": str({c: codes.count(c) for c in sorted(set(codes))}),
            "results_mean_output_throughput_token_per_s": _per_s(
                sum(rec["number_output_tokens"] for rec in good), duration
            ),
            "results_num_completed_requests": len(good),
            "results_num_completed_requests_per_min": _per_s(len(good), duration) * 60.0,
        }
    )
    summary.update(_vllm_keys(run))
    summary["timestamp"] = int(time.time())
    return summary, records


def _per_s(count: float, duration: float) -> float:
    return count / duration if duration > 0 else math.nan


def _stats_keys(prefix: str, stats: Stats) -> dict[str, float]:
    keys = {f"{prefix}_quantiles_{q}": float(getattr(stats, q)) for q in QUANTILES}
    keys.update(
        {
            f"{prefix}_mean": stats.mean,
            f"{prefix}_min": stats.min,
            f"{prefix}_max": stats.max,
            f"{prefix}_stddev": stats.stdev,
        }
    )
    return keys


def _vllm_keys(run: LoadRun) -> dict[str, Any]:
    """vLLM bench's result keys (milliseconds, population std, pooled ITL), prefixed `vllm_`."""
    summary = run.summary()
    keys: dict[str, Any] = {
        "vllm_completed": summary.completed,
        "vllm_failed": summary.errors,
        "vllm_duration": summary.duration_s,
        "vllm_request_throughput": _per_s(summary.completed, summary.duration_s),
        "vllm_output_throughput": summary.output_throughput_tok_s,
    }
    for name, stats in (
        ("ttft", summary.ttft_s),
        ("tpot", summary.tpot_s),
        ("itl", summary.itl_s),
        ("e2el", summary.e2e_s),
    ):
        keys[f"vllm_mean_{name}_ms"] = report.ms(stats.mean)
        keys[f"vllm_median_{name}_ms"] = report.ms(stats.p50)
        keys[f"vllm_std_{name}_ms"] = report.ms(stats.pstdev)
        keys[f"vllm_p99_{name}_ms"] = report.ms(stats.p99)
    return keys


def summary_lines(summary: Mapping[str, Any]) -> list[str]:
    """What llmperf prints at the end of a run, in its order and wording."""
    lines = []
    for metric in METRICS:
        prefix = f"results_{metric}"
        lines.append(metric)
        lines += [f"    {q} = {summary[f'{prefix}_quantiles_{q}']}" for q in QUANTILES]
        lines += [f"    {s} = {summary[f'{prefix}_{s}']}" for s in ("mean", "min", "max", "stddev")]
    lines.append(f"Number Of Errored Requests: {summary['results_number_errors']}")
    if summary["results_number_errors"]:
        lines += ["Error Code Frequency", str(summary["results_error_code_frequency"])]
    lines += [
        f"Overall Output Throughput: {summary['results_mean_output_throughput_token_per_s']}",
        f"Number Of Completed Requests: {summary['results_num_completed_requests']}",
        f"Completed Requests Per Minute: {summary['results_num_completed_requests_per_min']}",
    ]
    return lines


def write(
    results_dir: Path, summary: Mapping[str, Any], records: Sequence[Mapping[str, Any]]
) -> tuple[Path, Path]:
    """Write llmperf's two files; returns (summary path, individual responses path)."""
    stem = str(summary["name"]).removesuffix("_summary")
    summary_path = results_dir / f"{stem}_summary.json"
    records_path = results_dir / f"{stem}_individual_responses.json"
    report.write_json(summary_path, dict(summary))
    records_path.write_bytes(orjson.dumps(list(records), option=orjson.OPT_INDENT_2) + b"\n")
    return summary_path, records_path
