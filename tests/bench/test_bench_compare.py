"""`di-router bench compare --quick` end to end: both stacks, report, llmperf files, plots."""

from __future__ import annotations

import json
import struct
import subprocess
import sys

from di_router.bench.compare_report import SIDES

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def png_size(data: bytes) -> tuple[int, int]:
    """Width and height from the IHDR chunk, which a valid PNG has first."""
    assert data[:8] == PNG_MAGIC and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def test_quick_compare_writes_report_files_and_plots(tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "di_router.cli",
            "bench",
            "compare",
            "--quick",
            "--max-num-completed-requests=6",
            "--mean-output-tokens=8",
            "--concurrency=2,1",
            f"--results-dir={tmp_path}",
        ],
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-3000:]

    report = (tmp_path / "report.md").read_text()
    assert report in done.stdout
    assert "profile `trn2-llama3.3-70b-tp32`" in report  # the default profile, simulated
    for c in (1, 2):
        assert f"| {c:<11} | baseline " in report
        assert f"| {c:<11} | DI (router, 1P1D) " in report
        assert f"| {c:<11} | baseline x2 (hardware parity) " in report
        assert f"- At concurrency {c}, " in report
        for side in SIDES:
            summary = json.loads(
                (tmp_path / side / f"c{c}" / "llama-3-3-70b_256_8_summary.json").read_text()
            )
            assert summary["results_num_completed_requests"] == 6
            assert summary["num_concurrent_requests"] == c
            assert summary["results_number_errors"] == 0

    plots = ["ttft_cdf.png", "itl_cdf.png", "itl_over_time.png", "sweep.png"]
    for name in plots:
        assert f"![{name}]({name})" in report
        width, height = png_size((tmp_path / name).read_bytes())
        assert width > 300 and height > 200

    data = json.loads((tmp_path / "compare.json").read_text())
    assert set(data["runs"]) == set(SIDES)
    assert set(data["runs"]["di"]) == {"1", "2"}
    assert data["baseline_throughput_factor"] == 2.0
