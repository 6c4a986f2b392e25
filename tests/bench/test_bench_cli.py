"""`di-router bench` as a user runs it: a real process against real simulators and the router."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from di_router.bench import prompts, stack
from di_router.bench.tokenizer import SimTokenizer
from tests.support import running, scrape, start_sim, value

# The tutorial's llmperf.sh, scaled down.
FLAGS = [
    "--model=llama-3.3-70b",
    "--mean-input-tokens=64",
    "--stddev-input-tokens=8",
    "--mean-output-tokens=12",
    "--stddev-output-tokens=3",
    "--timeout=60",
    "--llm-api=openai",
    "--additional-sampling-params",
    '{"top_k": 50, "top_p": 0.9, "temperature": 0.7}',
]
STEM = "llama-3-3-70b_64_12"  # llmperf's file name for that model and sizes


def bench(base: str, results: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OPENAI_API_BASE": base, "OPENAI_API_KEY": "mock_key"}
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "di_router.cli",
            "bench",
            *FLAGS,
            *flags,
            f"--results-dir={results}",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
    )


def test_llmperf_files_and_counts_against_the_di_stack(tmp_path):
    with stack.di("instant") as di:
        done = bench(
            di.url + "/v1",
            tmp_path,
            "--max-num-completed-requests=10",
            "--num-concurrent-requests=3",
        )
        decode = scrape(di.servers["decode"].url)
    assert done.returncode == 0, done.stderr + done.stdout
    summary = json.loads((tmp_path / f"{STEM}_summary.json").read_text())
    records = json.loads((tmp_path / f"{STEM}_individual_responses.json").read_text())

    # llmperf's keys, and the simulator's own account of what it served
    served = value(decode, "vllm:request_success_total")
    generated = value(decode, "vllm:request_generation_tokens_sum")
    assert summary["results_num_completed_requests"] == served == 10
    assert summary["results_number_errors"] == 0 and summary["results_error_rate"] == 0
    assert sum(r["number_output_tokens"] for r in records) == generated
    assert summary["results_number_output_tokens_mean"] == generated / 10
    for key in (
        "results_ttft_s_quantiles_p50",
        "results_inter_token_latency_s_mean",
        "results_end_to_end_latency_s_quantiles_p99",
        "results_num_completed_requests_per_min",
        "results_mean_output_throughput_token_per_s",
        "vllm_median_tpot_ms",
    ):
        assert summary[key] > 0, key
    assert summary["additional_sampling_params_top_k"] == 50

    # each request got exactly the length llmperf's draw asked for (seed 11111, as llmperf)
    specs = prompts.llmperf_requests(SimTokenizer(), 10, 64, 8, 12, 3, 11111)
    assert sorted(r["number_output_tokens"] for r in records) == sorted(s.max_tokens for s in specs)
    assert sorted(r["number_input_tokens"] for r in records) == sorted(
        s.input_tokens for s in specs
    )
    for r in records:
        assert r["error_code"] is None and 0 < r["ttft_s"] <= r["end_to_end_latency_s"]
        assert len(r["token_arrival_s"]) == r["number_output_tokens"]

    out = done.stdout
    assert "Completed Requests Per Minute: " in out
    assert "Number Of Completed Requests: 10" in out
    assert "| TTFT ms" in out  # the readable table after llmperf's lines
    assert "\r" not in done.stderr  # no progress bar when not on a terminal


def test_two_bases_alternate_and_errors_are_counted(tmp_path):
    first, second = start_sim("baseline", name="first"), start_sim("baseline", name="second")
    with running(first, second):
        done = bench(
            f"{first.url}/v1;{second.url}/v1/",
            tmp_path,
            "--max-num-completed-requests=6",
            "--num-concurrent-requests=1",
            "--endpoint=completions",
        )
        counts = [value(scrape(p.url), "vllm:request_success_total") for p in (first, second)]
        # a wrong model name: every request fails with the server's 404, counted and shown
        wrong = bench(first.url, tmp_path, "--max-num-completed-requests=2", "--model=nope")
    assert done.returncode == 0, done.stderr + done.stdout
    records = json.loads((tmp_path / f"{STEM}_individual_responses.json").read_text())
    assert [r["server"] for r in records] == [first.url, second.url] * 3
    assert counts == [3, 3]
    # completions: the server's prompt count is exactly the client's
    assert all(r["server_prompt_tokens"] == r["number_input_tokens"] for r in records)

    assert wrong.returncode == 1
    summary = json.loads((tmp_path / "nope_64_12_summary.json").read_text())
    assert summary["results_number_errors"] == 2
    assert summary["results_error_code_frequency"] == "{404: 2}"
    assert "Error Code Frequency\n{404: 2}" in wrong.stdout
    assert "errors by code: 404: 2" in wrong.stdout
