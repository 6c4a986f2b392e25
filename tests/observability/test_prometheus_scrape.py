"""Issue 4: a real Prometheus scrapes the router and both vLLM servers with deploy/prometheus.yml.

The deploy file is used as shipped, with only its targets (and the 5 s interval, for speed)
rewritten to this test's ports. Its HTTP API must return the request count the test sent, and
every dashboard query must be valid PromQL there. `promtool check metrics` lints the expositions.
"""

from __future__ import annotations

import shutil
import subprocess
from typing import Any

import httpx
import pytest

from tests.observability.conftest import (
    PROMETHEUS_YML,
    dashboard,
    dashboard_exprs,
    promtool_check,
    scrape,
    wait_settled,
)
from tests.support import MODEL, Proc, di_stack, free_port, wait_until

PROMETHEUS, PROMTOOL = shutil.which("prometheus"), shutil.which("promtool")
pytestmark = pytest.mark.skipif(
    PROMETHEUS is None or PROMTOOL is None,
    reason="needs the `prometheus` and `promtool` binaries (Debian package `prometheus`, "
    "installed by .ci/run)",
)
SENT = 5
# vLLM's own names have colons (`vllm:...`), which promtool's linter flags: that is vLLM's
# naming, reproduced on purpose, not a format error.
COLON_LINT = "metric names should not contain ':'"


def rewritten_config(router: str, prefill: str, decode: str) -> str:
    text = PROMETHEUS_YML.read_text()
    for default, url in (
        ("localhost:8000", router),
        ("localhost:8100", prefill),
        ("localhost:8200", decode),
    ):
        assert text.count(f'"{default}"') == 1, f"{default} target not found once"
        text = text.replace(f'"{default}"', f'"{url.removeprefix("http://")}"')
    for job in ("router", "prefill", "decode"):
        assert f"job_name: {job}\n" in text, job
    assert text.count("scrape_interval: 5s") == 1
    return text.replace("scrape_interval: 5s", "scrape_interval: 1s")


def query(prom: Proc, promql: str) -> list[dict[str, Any]]:
    r = httpx.get(prom.url + "/api/v1/query", params={"query": promql}, timeout=5)
    body = r.json()
    assert r.status_code == 200 and body["status"] == "success", (promql, body)
    return body["data"]["result"]


def scalar(prom: Proc, promql: str) -> float | None:
    result = query(prom, promql)
    return float(result[0]["value"][1]) if result else None


def test_deploy_config_is_valid():
    check = subprocess.run(
        [str(PROMTOOL), "check", "config", str(PROMETHEUS_YML)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert check.returncode == 0, check.stdout + check.stderr


def test_prometheus_scrapes_router_and_servers(tmp_path):
    with di_stack() as stack:
        config = tmp_path / "prometheus.yml"
        config.write_text(rewritten_config(stack.router.url, stack.prefill.url, stack.decode.url))
        port = free_port()
        prom = Proc(
            "prometheus",
            [
                str(PROMETHEUS),
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'db'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            f"http://127.0.0.1:{port}",
        )
        try:
            prom.wait_ready("/-/ready")
            for i in range(SENT):
                r = httpx.post(
                    stack.router.url + "/v1/completions",
                    timeout=30,
                    json={
                        "model": MODEL,
                        "prompt": f"count me {i}",
                        "max_tokens": 3,
                        "stream": i % 2 == 0,
                    },
                )
                assert r.status_code == 200, r.text
            wait_settled(stack.router, SENT)

            wait_until(
                lambda: scalar(prom, "sum(di_router_requests_total)") == SENT,
                20,
                f"Prometheus to see {SENT} requests",
                interval=0.25,
            )
            all_up = {"router": "1", "prefill": "1", "decode": "1"}
            wait_until(
                lambda: {r["metric"]["job"]: r["value"][1] for r in query(prom, "up")} == all_up,
                10,
                "all three jobs scraped and up",
                interval=0.25,
            )
            assert scalar(prom, 'sum(vllm:generation_tokens_total{job="decode"})') > 0
            assert scalar(prom, 'sum(di_router_backend_up{job="router"})') == 2

            # Every dashboard query is valid PromQL against real data.
            panels = dashboard_exprs(dashboard(), variables=False)
            exprs = [e.replace("$model_name", ".*") for e in panels]
            for e in exprs:
                query(prom, e)
            # The model variable's label_values(di_router_requests_total, model_name).
            labels = httpx.get(
                prom.url + "/api/v1/label/model_name/values",
                params={"match[]": "di_router_requests_total"},
            ).json()
            assert labels["data"] == [MODEL], labels
            rate = (
                'sum by (endpoint, status) (rate(di_router_requests_total{model_name=~".*"}[1m]))'
            )
            assert rate in exprs
            wait_until(lambda: query(prom, rate), 15, "a request rate", interval=0.25)
        finally:
            prom.stop()


def test_promtool_accepts_the_expositions():
    with di_stack() as stack:
        r = httpx.post(
            stack.router.url + "/v1/chat/completions",
            timeout=30,
            json={
                "model": MODEL,
                "max_tokens": 3,
                "stream": True,
                "messages": [{"role": "user", "content": "lint me"}],
            },
        )
        assert r.status_code == 200
        wait_settled(stack.router, 1)
        router, sim = scrape(stack.router.url), scrape(stack.decode.url)
    check = promtool_check(router)
    assert check.returncode == 0 and not (check.stdout + check.stderr).strip(), (
        check.stdout + check.stderr
    )
    check = promtool_check(sim)
    problems = [ln for ln in (check.stdout + check.stderr).splitlines() if ln.strip()]
    assert check.returncode in (0, 3), problems  # 3: lint findings only, the format parsed
    # vLLM 0.7.2's own names: colons, and a histogram called `vllm:iteration_tokens_total`.
    expected = (COLON_LINT, "vllm:iteration_tokens_total non-counter metrics should not have")
    assert all(ln.endswith(COLON_LINT) or ln.startswith(expected[1]) for ln in problems), problems
    # The check can fail: a malformed exposition is rejected.
    assert promtool_check("di_router_requests_total{endpoint=\n").returncode not in (0, 3)
