"""The planner's engines in virtual time: determinism, one engine under both clocks, and cases
checkable by hand against the profile's formulas."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import pytest

from di_router.bench.loadgen import LoadRun, RequestSpec
from di_router.plan import vclock
from di_router.plan.commands import commands
from di_router.plan.layouts import Layout
from di_router.plan.simulate import DIRECT_S, ROUTER_S, Load, drive, simulate
from di_router.plan.workload import drawn
from di_router.sim.profiles import PROFILES, TimingProfile

TRN2 = PROFILES["trn2-llama3.3-70b-tp32"]
DI = Layout("di", 32, 4, prefills=1, decodes=1)
BASELINE = Layout("baseline", 32, 4, servers=1)


def test_a_single_request_follows_the_profile_formulas() -> None:
    spec = [RequestSpec("", 100, 1024)]
    di = simulate(DI, TRN2, spec, Load(concurrency=1)).results[0]
    path = DIRECT_S + ROUTER_S
    assert di.ttft == pytest.approx(TRN2.prefill_seconds(1024) + path)
    e2e = TRN2.prefill_seconds(1024) + TRN2.kv_transfer_seconds(1024)
    e2e += 99 * TRN2.decode_step_seconds(1) + path
    assert di.e2e == pytest.approx(e2e)
    base = simulate(BASELINE, TRN2, spec, Load(concurrency=1)).results[0]
    assert base.ttft == pytest.approx(TRN2.prefill_seconds(1024) + DIRECT_S)
    assert base.e2e == pytest.approx(
        TRN2.prefill_seconds(1024) + 99 * TRN2.decode_step_seconds(1) + DIRECT_S
    )
    assert len(di.token_times) == len(base.token_times) == 100


def test_a_run_is_deterministic_for_a_seed() -> None:
    specs = drawn(300, 1024, 100, 100, 10, seed=7)
    layout = Layout("di", 32, 8, prefills=1, decodes=2)

    def trace(seed: int) -> list[list[float]]:
        run = simulate(layout, TRN2, specs, Load(request_rate=3.0, seed=seed))
        return [r.token_times for r in run.results]

    assert trace(1) == trace(1)
    assert trace(1) != trace(2)


def test_1000_requests_take_well_under_two_seconds_of_cpu() -> None:
    specs = drawn(1000, 1024, 0, 100, 10, seed=1)
    started = time.process_time()
    run = simulate(Layout("di", 32, 8, prefills=1, decodes=1), TRN2, specs, Load(2.0))
    assert run.summary().completed == 1000
    assert time.process_time() - started < 2.0


def test_one_engine_code_under_both_clocks_gives_the_same_schedule() -> None:
    """The same `drive` (engines, router pairing, KV pull) on the real event loop and on the
    virtual one: token times agree within the real loop's timer jitter."""
    profile = TimingProfile(prefill_base_ms=40, decode_base_ms=15, kv_setup_ms=5)
    specs = [RequestSpec("", 6, 100 * (i + 1)) for i in range(4)]
    load = Load(concurrency=2)

    async def on_real_loop() -> LoadRun:
        return await drive(DI, profile, specs, load, vclock.LoopClock(asyncio.get_running_loop()))

    real = asyncio.run(on_real_loop())
    virtual = simulate(DI, profile, specs, load)
    for r, v in zip(real.results, virtual.results, strict=True):
        real_times = [t - real.results[0].send_time for t in r.token_times]
        virtual_times = [t - virtual.results[0].send_time for t in v.token_times]
        assert real_times == pytest.approx(virtual_times, abs=0.015)


def test_two_prefills_per_second_into_one_decode_per_second_serve_one() -> None:
    """Prefill 0.5 s (2/s), decode 20 steps of 0.1 s at batch 2 (1/s): 1P1D serves 1/s, so
    does 2P1D (the decode limits); a second decode (1P2D) lifts it toward the prefill's 2/s."""
    profile = TimingProfile(prefill_base_ms=500, decode_base_ms=100, link_gbps=float("inf"))
    specs = [RequestSpec("", 21, 10)] * 80
    load = Load(concurrency=8)

    def rate(prefills: int, decodes: int) -> float:
        layout = Layout("di", 32, 2, prefills=prefills, decodes=decodes)
        return simulate(layout, profile, specs, load).summary().requests_per_minute / 60

    # at most 1/s; a little less, as a decode slot is taken on admission, before its KV exists
    assert 0.9 < rate(1, 1) <= 1.0
    assert 0.9 < rate(2, 1) <= 1.0
    assert 1.5 < rate(1, 2) <= 2.0


def test_colocated_itl_tail_grows_with_input_length_and_di_does_not() -> None:
    """A baseline's running sequences wait out other requests' prefills; DI's decode does not."""

    def gap_p99(layout: Layout, input_tokens: int) -> float:
        specs = drawn(200, input_tokens, 0, 100, 10, seed=3)
        return simulate(layout, TRN2, specs, Load(request_rate=1.0)).summary().itl_s.p99

    step = TRN2.decode_step_seconds(4)
    short, long = gap_p99(BASELINE, 512), gap_p99(BASELINE, 2048)
    assert long > short + 0.1  # a 2048-token prefill stalls ~0.25 s more than a 512-token one
    assert short > TRN2.prefill_seconds(512)  # the stall is a whole prefill
    for tokens in (512, 2048):
        # at worst the first gap: the KV transfer, then one step
        assert gap_p99(DI, tokens) <= TRN2.kv_transfer_seconds(tokens) + step + 1e-9


def test_plan_quick_writes_the_table_the_plot_and_the_commands(tmp_path: Path) -> None:
    started = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-m", "di_router.cli", "plan", "--quick", "--instances", "1",
         "--mean-input-tokens", "1024", "--mean-output-tokens", "100",
         "--stddev-output-tokens", "10", "--ttft-p99", "2", "--itl-p99", "0.035",
         "--results-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert time.monotonic() - started < 60
    assert "| layout" in out.stdout and "Recommended:" in out.stdout
    assert "di-router compile --model-path" in out.stdout
    assert out.stderr == ""  # no progress bar when not a TTY
    text = (tmp_path / "plan.md").read_text()
    assert "1P1D TP32 b16" in text and "1x baseline TP64 b4" in text
    assert (tmp_path / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "plan.json").stat().st_size > 0


def test_plan_refuses_a_bad_replay_file(tmp_path: Path) -> None:
    bad = tmp_path / "x.json"
    bad.write_text("{}")
    out = subprocess.run(
        [sys.executable, "-m", "di_router.cli", "plan", "--replay", str(bad)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 2
    assert "expected a JSON list" in out.stderr


def test_the_plan_deploys_p_unequal_d_through_etcd() -> None:
    """P != D needs any-to-any pairing: the etcd form the agreement test runs for 1P2D."""
    lines = commands(Layout("di", 32, 8, prefills=1, decodes=2), "~/m")
    assert lines[-1] == "neuron-proxy-server --host 0.0.0.0 --port 8000 --etcd ETCD_HOST:8989"
    assert sum('"etcd":"ETCD_HOST:8989"' in line for line in lines) == 2  # producer, consumer
    assert not any(line.startswith(("di-router up", "di-router serve")) for line in lines)
