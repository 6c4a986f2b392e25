"""Metric formulas on hand-made traces with known answers (no servers: pure arithmetic)."""

from __future__ import annotations

import io
import math

import pytest

from di_router.bench import compare_report, llmperf_results, loadgen, runner
from di_router.bench.loadgen import LoadRun, RequestResult, RequestSpec
from di_router.bench.progress import Progress


def trace(index: int, times: list[float], tokens: int | None = None, **kw) -> RequestResult:
    """A request sent at 0 whose content events arrived at `times`; ends at the last one."""
    end = times[-1] if times else 0.5
    return RequestResult(
        index=index,
        send_time=0.0,
        status=kw.pop("status", 200),
        token_times=times,
        end_time=end,
        usage_tokens=tokens if tokens is not None else len(times),
        **kw,
    )


# TTFT 0.1, gaps 0.02, 0.02, 0.06: one stall.
STALLED = trace(0, [0.1, 0.12, 0.14, 0.2])
SINGLE = trace(1, [0.3])
FAILED = trace(2, [], status=503, error="HTTP 503: busy", error_code=503)
IN_STREAM = trace(3, [0.05], error="in-stream error: boom", error_code=500)


def test_per_request_definitions():
    assert STALLED.ttft == pytest.approx(0.1)
    assert STALLED.gaps == pytest.approx([0.02, 0.02, 0.06])
    # upstream llmperf: (TTFT + gaps) / tokens
    assert STALLED.llmperf_itl == pytest.approx(0.2 / 4)
    # Neuron's patch: gaps / (tokens - 1)
    assert STALLED.neuron_itl == pytest.approx(0.1 / 3)
    # vLLM TPOT: (last - first) / (tokens - 1)
    assert STALLED.tpot == pytest.approx(0.1 / 3)
    # a usage count above the event count (several tokens per event) changes the divisors
    packed = trace(9, [0.1, 0.2], tokens=5)
    assert packed.llmperf_itl == pytest.approx(0.2 / 5)
    assert packed.neuron_itl == pytest.approx(0.1 / 4)


def test_single_token_request():
    assert SINGLE.llmperf_itl == pytest.approx(0.3)  # all of it is TTFT
    assert SINGLE.neuron_itl is None and SINGLE.tpot is None  # no gap to average
    assert SINGLE.gaps == []


def test_linear_interpolation_quantiles():
    data = [1.0, 2.0, 3.0, 4.0]
    assert loadgen.percentile(data, 50) == 2.5
    assert loadgen.percentile(data, 90) == pytest.approx(3.7)
    assert loadgen.percentile(data, 25) == pytest.approx(1.75)
    assert loadgen.percentile(data, 0) == 1.0 and loadgen.percentile(data, 100) == 4.0
    stats = loadgen.Stats.of([4.0, 1.0, 3.0, 2.0])
    assert (stats.p25, stats.p75, stats.p95) == pytest.approx((1.75, 3.25, 3.85))
    assert stats.stdev == pytest.approx(math.sqrt(5 / 3))  # pandas: ddof=1
    assert stats.pstdev == pytest.approx(math.sqrt(5 / 4))  # numpy: ddof=0


def test_summary_counts_errors_apart_and_pools_gaps():
    run = LoadRun([STALLED, SINGLE, FAILED, IN_STREAM], duration_s=30.0)
    s = run.summary()
    assert (s.requests, s.completed, s.errors) == (4, 2, 2)
    assert s.error_codes == {500: 1, 503: 1}
    assert s.requests_per_minute == pytest.approx(2 / 30 * 60)
    assert s.output_throughput_tok_s == pytest.approx(5 / 30)
    assert s.itl_s.count == 3  # pooled gaps of successful requests only
    assert s.itl_s.max == pytest.approx(0.06)
    assert s.ttft_s.p50 == pytest.approx(0.2)  # of 0.1 and 0.3
    assert s.tpot_s.count == 1  # the single-token request has no TPOT


SPECS = [RequestSpec("p", 4, 10), RequestSpec("p", 1, 10), RequestSpec("p", 8, 10)]


def llmperf_info(definition: llmperf_results.ItlDefinition) -> llmperf_results.RunInfo:
    return llmperf_results.RunInfo("org/Model.v1", 10, 0, 4, 1, 2, {"top_k": 50}, definition)


@pytest.mark.parametrize(
    ("definition", "mean"),
    [("llmperf", (0.05 + 0.3) / 2), ("neuron", (0.1 / 3 + 0.0) / 2), ("vllm", 0.1 / 3)],
)
def test_llmperf_summary_keys_and_headline_itl(definition, mean):
    run = LoadRun([STALLED, SINGLE, FAILED], duration_s=12.0)
    summary, records = llmperf_results.summarize(llmperf_info(definition), run, SPECS)
    assert summary["name"] == "org-Model-v1_10_4_summary"  # llmperf's file name rule
    assert summary["additional_sampling_params_top_k"] == 50
    assert summary["results_inter_token_latency_s_mean"] == pytest.approx(mean)
    assert summary["results_num_completed_requests"] == 2
    assert summary["results_num_requests_started"] == 3
    assert summary["results_number_errors"] == 1
    assert summary["results_error_rate"] == pytest.approx(1 / 3)
    assert summary["results_error_code_frequency"] == "{503: 1}"
    assert summary["results_num_completed_requests_per_min"] == pytest.approx(10.0)
    assert summary["results_mean_output_throughput_token_per_s"] == pytest.approx(5 / 12)
    assert summary["results_ttft_s_quantiles_p50"] == pytest.approx(0.2)
    assert summary["results_number_output_tokens_mean"] == pytest.approx(2.5)
    assert summary["vllm_median_ttft_ms"] == pytest.approx(200.0)
    assert summary["vllm_p99_itl_ms"] == pytest.approx(
        1e3 * loadgen.percentile([0.02, 0.02, 0.06], 99)
    )
    assert [r["error_code"] for r in records] == [None, None, 503]
    assert records[2]["error_msg"] == "HTTP 503: busy"
    assert records[0]["number_total_tokens"] == 14
    assert records[0]["request_output_throughput_token_per_s"] == pytest.approx(4 / 0.2)
    lines = llmperf_results.summary_lines(summary)
    assert "Completed Requests Per Minute: 10.0" in lines
    assert lines[lines.index("Error Code Frequency") + 1] == "{503: 1}"


def bench_result(times: list[float], duration: float) -> runner.BenchResult:
    specs = [RequestSpec("p", len(times), 10)] * 4
    run = LoadRun([trace(i, times) for i in range(4)], duration)
    summary, records = llmperf_results.summarize(llmperf_info("neuron"), run, specs)
    return runner.BenchResult(runner.Workload("m"), specs, run, summary, records, run.summary())


def test_verdict_follows_the_numbers():
    smooth = bench_result([0.1, 0.12, 0.14, 0.16], duration=10.0)  # 24 req/min
    stalled = bench_result([0.1, 0.12, 0.3, 0.32], duration=8.0)  # 30 req/min, x2 = 60
    cmp = compare_report.Comparison(
        {"baseline": {4: stalled}, "di": {4: smooth}}, 2.0, {"baseline": "b", "di": "d"}
    )
    sentence = compare_report.verdict(cmp, 4)
    assert "TTFT is a tie" in sentence
    assert "DI wins on ITL (p99 of the gaps: DI 20.0 ms, baseline 180 ms; neuron mean" in sentence
    assert "the baseline wins on throughput (DI 24.0 req/min, baseline x2 60.0)" in sentence
    swapped = compare_report.Comparison(
        {"baseline": {4: smooth}, "di": {4: stalled}}, 0.5, {"baseline": "b", "di": "d"}
    )
    sentence = compare_report.verdict(swapped, 4)
    assert "the baseline wins on ITL" in sentence
    # DI's first token early, then a long wait (for a decode slot): fine tail, worse mean
    waiting = bench_result([0.1, 1.6] + [1.6 + (i + 1) / 50 for i in range(198)], 10.0)
    steady = bench_result([0.1 + i / 40 for i in range(200)], 10.0)
    split = compare_report.Comparison(
        {"baseline": {8: steady}, "di": {8: waiting}}, 2.0, {"baseline": "b", "di": "d"}
    )
    expected = (
        "ITL is split (DI wins on the tail, p99 of the gaps: DI 20.0 ms, baseline 25.0 ms; "
        "the baseline wins on the mean, neuron mean: DI 27.4 ms, baseline 25.0 ms)"
    )
    assert expected in compare_report.verdict(split, 8)
    assert "DI wins on throughput (DI 30.0 req/min, baseline x0.5 12.0)" in sentence
    assert "| 4 " in compare_report.table(cmp)


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_on_a_terminal_only():
    screen, pipe = Terminal(), io.StringIO()
    on_screen, piped = Progress(4, "di c=4 ", screen), Progress(4, "", pipe)
    for result in (STALLED, FAILED, SINGLE):
        on_screen(result)
        piped(result)
    on_screen.close()
    piped.close()
    assert pipe.getvalue() == ""
    last = screen.getvalue().split("\r")[-1]
    assert last.startswith("di c=4 [######################........] 3/4 requests, 1 errors, ")
    assert last.endswith(" req/min\n")
