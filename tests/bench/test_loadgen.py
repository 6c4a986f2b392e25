"""The load generator against real processes: counts exact, timings consistent and honest."""

from __future__ import annotations

import asyncio
import itertools
import random

import pytest

from di_router.bench import loadgen, stack


def test_di_stack_counts_and_ordering():
    specs = loadgen.make_requests(8, input_tokens=64, output_mean=24, output_sd=4, seed=1)
    with stack.di("instant") as di:
        config = loadgen.LoadConfig(di.url, concurrency=2, sampling=loadgen.TUTORIAL_SAMPLING)
        run = asyncio.run(loadgen.run_load(config, specs))
    summary = run.summary()
    assert summary.requests == summary.completed == 8
    assert summary.errors == 0
    assert [r.index for r in run.results] == list(range(8))
    for spec, result in zip(specs, run.results, strict=True):
        assert result.status == 200
        assert result.usage_tokens == spec.max_tokens  # ignore_eos + usage chunk
        assert len(result.token_times) == spec.max_tokens  # one content event per token
        assert result.ttft is not None and result.e2e is not None
        assert 0 < result.ttft <= result.e2e
    assert summary.output_tokens == sum(s.max_tokens for s in specs)
    assert summary.itl_s.count == sum(s.max_tokens - 1 for s in specs)
    assert summary.ttft_s.p50 <= summary.ttft_s.p99 <= summary.e2e_s.max


def test_ttft_reflects_prefill_cost():
    specs = loadgen.make_requests(4, input_tokens=32, output_mean=4)
    with stack.baseline("instant", sim_args=["--sim-prefill-base-ms", "200"]) as base:
        config = loadgen.LoadConfig(base.url, endpoint="completions", concurrency=2)
        run = asyncio.run(loadgen.run_load(config, specs))
    summary = run.summary()
    assert summary.completed == 4
    assert all(r.prompt_tokens == 32 for r in run.results)
    assert summary.ttft_s.p50 >= 0.2


def test_percentile_is_linear_interpolation():
    data = [1.0, 2.0, 3.0, 4.0]
    assert loadgen.percentile(data, 50) == 2.5
    assert loadgen.percentile(data, 90) == pytest.approx(3.7)
    assert loadgen.percentile(data, 0) == 1.0
    assert loadgen.percentile(data, 100) == 4.0


def test_open_loop_arrivals_and_in_flight_bound():
    """Poisson arrivals at a high rate: concurrency 1 serialises them, 4 lets them overlap."""
    specs = loadgen.make_requests(8, input_tokens=16, output_mean=2)
    with stack.baseline("instant", sim_args=["--sim-prefill-base-ms", "40"]) as base:

        def run(concurrency: int) -> loadgen.LoadRun:
            config = loadgen.LoadConfig(
                base.url, endpoint="completions", concurrency=concurrency, request_rate=500.0
            )
            return asyncio.run(loadgen.run_load(config, specs))

        serial, overlapped = run(1), run(4)
        config = loadgen.LoadConfig(
            base.url, endpoint="completions", concurrency=8, request_rate=25.0
        )
        spread = asyncio.run(loadgen.run_load(config, specs))
    # open loop: sends follow the seeded exponential gaps, not the completions
    rng = random.Random(config.arrival_seed)
    planned = sum(rng.expovariate(25) for _ in range(7))
    assert spread.summary().completed == 8
    sends = sorted(r.send_time for r in spread.results)
    assert planned <= sends[-1] - sends[0] < planned + 0.5
    for run_ in (serial, overlapped):
        assert run_.summary().completed == 8
    ordered = sorted(serial.results, key=lambda r: r.send_time)
    for before, after in itertools.pairwise(ordered):
        assert before.end_time is not None and after.send_time >= before.end_time
    ordered = sorted(overlapped.results, key=lambda r: r.send_time)
    assert any(
        after.send_time < (before.end_time or 0.0) for before, after in itertools.pairwise(ordered)
    )
