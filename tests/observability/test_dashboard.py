"""Issue 4, deployment files: the Grafana dashboard loads and queries only real metrics.

Every metric a query names must be a series Prometheus would store from the router's or the
simulator's real /metrics (a histogram's `_bucket`, a counter's `_total`...). The real
Prometheus server runs every query in `test_prometheus_scrape.py`.
"""

from __future__ import annotations

import httpx

from tests.observability.conftest import (
    METRIC_NAME,
    dashboard,
    dashboard_exprs,
    exported_names,
    scrape,
)
from tests.support import MODEL, di_stack

REQUIRED = {  # what the issue asks the dashboard to show, as the series its queries must use
    "TTFT p50/p99": ("di_router_time_to_first_token_seconds_bucket", ("0.5", "0.99")),
    "ITL p50/p99": ("di_router_inter_token_latency_seconds_bucket", ("0.5", "0.99")),
    "prefill p50/p99": ("di_router_prefill_latency_seconds_bucket", ("0.5", "0.99")),
    "hand-off p50/p99": ("di_router_kv_handoff_seconds_bucket", ("0.5", "0.99")),
}


def test_dashboard_is_a_grafana_model_with_the_required_panels():
    dash = dashboard()
    assert dash["title"] and dash["uid"] and isinstance(dash["schemaVersion"], int)
    panels = dash["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for p in panels:
        assert {"x", "y", "w", "h"} <= set(p["gridPos"]), p["title"]
        if p["type"] != "row":
            assert p["targets"], p["title"]
            assert p["datasource"]["uid"] == "${datasource}", p["title"]
    exprs = dashboard_exprs(dash)
    for what, (series, quantiles) in REQUIRED.items():
        for q in quantiles:
            assert any(f"histogram_quantile({q}," in e and series in e for e in exprs), what
    joined = "\n".join(exprs)
    for series in (
        "di_router_requests_total",
        "di_router_upstream_errors_total",
        "di_router_requests_in_flight",
        "di_router_backend_up",
    ):
        assert series in joined, series
    assert 'status!~"2.."' in joined  # the error rate counts every non-2xx answer


def test_every_query_names_an_exported_metric():
    with di_stack() as stack:
        r = httpx.post(
            stack.router.url + "/v1/completions",
            timeout=30,
            json={"model": MODEL, "prompt": "hi there", "max_tokens": 3, "stream": True},
        )
        assert r.status_code == 200
        exported = (
            exported_names(scrape(stack.router.url))
            | exported_names(scrape(stack.prefill.url))
            | exported_names(scrape(stack.decode.url))
        )
    exprs = dashboard_exprs(dashboard())
    assert exprs
    named = {name for e in exprs for name in METRIC_NAME.findall(e)}
    assert any(n.startswith("vllm:") for n in named)
    missing = {n for n in named if n not in exported}
    assert not missing, f"dashboard queries name metrics nobody exports: {sorted(missing)}"
    for e in exprs:
        assert METRIC_NAME.search(e), f"query names no di_router_/vllm: metric: {e}"
