"""Helpers for the observability tests: stacks, scraping and parsing metrics."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from tests.support import Proc, samples, scrape, value, wait_until

REPO = Path(__file__).resolve().parents[2]
PROMETHEUS_YML = REPO / "deploy" / "prometheus.yml"
DASHBOARD_JSON = REPO / "deploy" / "grafana" / "di-router-dashboard.json"

# Labels the router may use: all bounded (no request ids, prompts or client-supplied text).
ALLOWED_LABELS = {
    "paired_with",
    "model_name",
    "endpoint",
    "status",
    "role",
    "error_type",
    "backend",
    "outcome",
    "le",
}


# -- metrics ---------------------------------------------------------------------------------


def by_label(text: str, name: str, *keys: str) -> dict[tuple[str, ...], float]:
    """Samples of `name` summed by the given label keys (other labels, e.g. model, summed)."""
    out: dict[tuple[str, ...], float] = {}
    for s in samples(text):
        if s.name == name:
            key = tuple(s.labels.get(k, "") for k in keys)
            out[key] = out.get(key, 0.0) + s.value
    return out


def wait_settled(router: Proc, total: int, timeout: float = 10) -> str:
    """Poll until the router has finished `total` requests and holds none; return that scrape."""

    def settled() -> str | None:
        text = scrape(router.url)
        done = value(text, "di_router_requests_total")
        in_flight = value(text, "di_router_requests_in_flight")
        return text if done == total and in_flight == 0 else None

    return wait_until(settled, timeout, f"{total} finished requests and none in flight")


def promtool() -> str | None:
    return shutil.which("promtool")


def promtool_check(exposition: str) -> subprocess.CompletedProcess[str]:
    tool = promtool()
    assert tool is not None
    return subprocess.run(
        [tool, "check", "metrics"], input=exposition, capture_output=True, text=True, timeout=30
    )


# -- dashboard -------------------------------------------------------------------------------

METRIC_NAME = re.compile(r"\b(?:di_router_[a-z0-9_]+|vllm:[a-z0-9_:]+)")  # e2e has a digit


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD_JSON.read_text())


def dashboard_exprs(dash: dict[str, Any], variables: bool = True) -> list[str]:
    """Every query in the dashboard: panel targets' PromQL (nested rows too) and, unless
    `variables` is false, the variables' Grafana queries (`label_values(...)`)."""
    found: list[str] = []

    def walk(node: object) -> None:
        if isinstance(node, dict):
            for key, item in node.items():
                if key == "expr" and isinstance(item, str):
                    found.append(item)
                else:
                    walk(item)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(dash.get("panels", []))
    templating = dash.get("templating", {}).get("list", []) if variables else []
    for variable in templating:
        query = variable.get("query")
        text = query.get("query") if isinstance(query, dict) else query
        if variable.get("type") == "query" and isinstance(text, str):
            found.append(text)
    return found


def exported_names(text: str) -> set[str]:
    """Series names Prometheus stores from an exposition, by each family's declared type."""
    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_count", "_sum", "_created"),
        "gauge": ("",),
        "summary": ("", "_count", "_sum", "_created"),
    }
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        names.update(family.name + s for s in suffixes.get(family.type, ("",)))
        names.update(s.name for s in family.samples)
    return names
