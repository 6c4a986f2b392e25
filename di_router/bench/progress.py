"""A one-line progress bar for a benchmark run: requests done, errors, current req/min.

Written with carriage returns to a terminal only; piped or captured output (CI logs, tests) stays
free of it, as llmperf's tqdm bar is noise there too.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from di_router.bench.loadgen import RequestResult

WIDTH = 30


class Progress:
    def __init__(self, total: int, label: str = "", stream: TextIO | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = self.stream.isatty()
        self.total = total
        self.label = label
        self.done = 0
        self.errors = 0
        self.started = time.perf_counter()

    def __call__(self, result: RequestResult) -> None:
        """Count one finished request (the load generator's `on_result` hook)."""
        self.done += 1
        self.errors += 0 if result.ok else 1
        if self.enabled:
            self.stream.write("\r" + self.line())
            self.stream.flush()

    def line(self) -> str:
        elapsed = time.perf_counter() - self.started
        rpm = (self.done - self.errors) / elapsed * 60.0 if elapsed > 0 else 0.0
        filled = WIDTH * self.done // self.total if self.total else WIDTH
        bar = "#" * filled + "." * (WIDTH - filled)
        return (
            f"{self.label}[{bar}] {self.done}/{self.total} requests, "
            f"{self.errors} errors, {rpm:.1f} req/min"
        )

    def close(self) -> None:
        if self.enabled and self.done:
            self.stream.write("\n")
            self.stream.flush()
