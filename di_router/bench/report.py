"""Plain-text rendering of benchmark results: markdown tables and a JSON file with provenance."""

from __future__ import annotations

import datetime
import math
import os
import platform
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson


def markdown_table(
    headers: Sequence[str], rows: Sequence[Sequence[object]], text_columns: int = 1
) -> str:
    """A GitHub markdown table; the first `text_columns` are left-aligned, the rest (numbers)
    right-aligned."""
    cells = [[str(c) for c in headers], *[[fmt(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    align = ["-" * w if i < text_columns else "-" * (w - 1) + ":" for i, w in enumerate(widths)]
    lines = [cells[0], align, *cells[1:]]
    return "\n".join(
        "| " + " | ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) + " |"
        for line in lines
    )


def fmt(value: object) -> str:
    """Floats with 3 significant-ish digits, so tables stay narrow and honest about precision."""
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        if abs(value) >= 100:
            return f"{value:,.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.3g}" if abs(value) < 1 else f"{value:.2f}"
    return str(value)


def ms(seconds: float) -> float:
    return seconds * 1e3


def ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else math.nan


def environment() -> dict[str, Any]:
    """Where and when a result was measured: numbers mean little without it."""
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
    }


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(orjson.dumps(data, option=orjson.OPT_INDENT_2) + b"\n")
