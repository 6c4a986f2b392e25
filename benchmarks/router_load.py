"""Router under load (issue 8): direct vs the one-leg floor vs di-router vs Neuron's router.

One run, on the same backends, interleaved per load so that a noisy neighbour hits every target:

* direct: the client talks to one backend;
* floor: `passthrough_floor.py` in front of that backend (one leg, bytes relayed unparsed);
* router: di-router in front of a prefill and a decode backend;
* neuron (with `--neuron-proxy CMD`): Neuron's `neuron-proxy-server` in front of the same two.

Loads: concurrency 1 (added TTFT), 64 and 256 with 16-token streams (req/s, TTFT), and 1,000
concurrent streams of 100 tokens one 20 ms decode step apart (req/s, errors, TTFT p99, the
proxies' peak RSS and CPU). Backends: `zero_backend.py` (no work per token, so the router's share
shows) and the simulator's `instant` profile. The first three loads run on backends without
delay, the last on a second set whose decode steps take 20 ms.

    python benchmarks/router_load.py [--quick] [--neuron-proxy "python /tmp/neuron-proxy/proxy.py
        --port {port} --prefill-port {prefill_port} --decode-port {decode_port}"]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import math
import resource
import shlex
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import uvloop
from load_client import LoadResult, client_session, closed_loop, completion_body
from prometheus_client.parser import text_string_to_metric_families

from di_router.bench import report, stack
from di_router.bench.stack import HOST, MODEL, Server

HERE = Path(__file__).parent
RESULTS = HERE / "results" / "router_load.json"
RESULTS_QUICK = HERE / "results" / "router_load_quick.json"
TARGETS = ("direct", "floor", "router", "neuron")
NEURON_DEFAULT_PORT = 8000  # neuron-proxy-server has no --port: it always listens here


@dataclass(frozen=True)
class Load:
    name: str
    concurrency: int
    tokens: int
    requests: int | None = None
    duration_s: float | None = None


def loads(quick: bool) -> tuple[list[Load], list[Load]]:
    """(loads on undelayed backends, loads on backends with 20 ms decode steps)."""
    window = 3.0 if quick else 10.0
    fast = [
        Load("c1", 1, 16, requests=40 if quick else 300),
        Load("c64", 64, 16, duration_s=window),
        Load("c256", 256, 16, duration_s=window),
    ]
    return fast, [Load("1000 streams", 1000, 100, requests=1000 if quick else 2000)]


def wait_listening(servers: list[Server], timeout_s: float = stack.READY_TIMEOUT_S) -> None:
    """For servers without a health route: bounded poll until each accepts a connection."""
    deadline = time.monotonic() + timeout_s
    for server in servers:
        port = int(server.url.rsplit(":", 1)[1])
        while True:
            if server.popen.poll() is not None:
                raise stack.StackError(f"{server.name} exited:\n{server.log_tail()}")
            with contextlib.suppress(OSError), socket.create_connection((HOST, port), 0.5):
                break
            if time.monotonic() > deadline:
                raise stack.StackError(f"{server.name} not listening:\n{server.log_tail()}")
            time.sleep(0.05)


def fill(template: str, ports: dict[str, int]) -> list[str]:
    return [arg.format(host=HOST, **ports) for arg in shlex.split(template)]


@contextlib.contextmanager
def backends_and_proxies(
    kind: str, step_ms: float, args: argparse.Namespace
) -> Iterator[dict[str, Server]]:
    """Backends of one kind (baseline, prefill, decode) and every proxy in front of them."""
    with contextlib.ExitStack() as started:
        servers: dict[str, Server] = {}

        def start(name: str, argv: list[str], port: int) -> Server:
            server = Server(name, argv, f"http://{HOST}:{port}")
            started.callback(server.stop)
            servers[name] = server
            return server

        kv_port = stack.free_port()
        ports = {role: stack.free_port() for role in ("baseline", "prefill", "decode")}
        for role, port in ports.items():
            if kind == "zero":
                argv = [sys.executable, str(HERE / "zero_backend.py"), "--port", str(port)]
                argv += ["--token-delay-ms", str(step_ms)]
            else:
                extra = ["--sim-decode-base-ms", str(step_ms)] if step_ms else []
                argv = stack.sim_argv(role, port, kv_port, "instant", 1024, extra)
            start(role, argv, port)
        stack.wait_ready(list(servers.values()), "/health")
        proxy_ports = {
            "port": stack.free_port(),
            "prefill_port": ports["prefill"],
            "decode_port": ports["decode"],
        }
        floor_port = stack.free_port()
        floor_argv = [sys.executable, str(HERE / "passthrough_floor.py"), "--port", str(floor_port)]
        start("floor", [*floor_argv, "--upstream", servers["baseline"].url], floor_port)
        if args.router_cmd:
            router_argv = fill(args.router_cmd, proxy_ports)
        else:
            router_argv = stack.router_argv(proxy_ports["port"], ports["prefill"], ports["decode"])
        start("router", router_argv, proxy_ports["port"])
        waiting: list[Server] = []
        if args.neuron_proxy:
            neuron_ports = {**proxy_ports, "port": stack.free_port()}
            if "{port}" not in args.neuron_proxy:
                neuron_ports["port"] = NEURON_DEFAULT_PORT
            start("neuron", fill(args.neuron_proxy, neuron_ports), neuron_ports["port"])
            waiting.append(servers["neuron"])
        wait_listening(waiting)
        stack.wait_ready([servers["floor"]], "/health")
        stack.wait_ready([servers["router"]], "/ready")
        yield servers


class DownWatch:
    """Scrapes the router's `di_router_backend_up` while it is under load: a busy backend
    must never be reported as a dead one."""

    def __init__(self, router_url: str) -> None:
        self.url = router_url + "/metrics"
        self.down_seen: set[str] = set()
        self.scrapes = 0
        self.failures = 0

    async def watch(self, session: aiohttp.ClientSession, interval_s: float = 0.5) -> None:
        while True:
            try:
                async with session.get(self.url) as response:
                    self.down_seen |= down_backends(await response.text())
                self.scrapes += 1
            except (aiohttp.ClientError, TimeoutError):
                self.failures += 1
            await asyncio.sleep(interval_s)


def down_backends(metrics_text: str) -> set[str]:
    """The label sets of every `di_router_backend_up` sample that is 0."""
    return {
        " ".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
        for family in text_string_to_metric_families(metrics_text)
        for sample in family.samples
        if sample.name == "di_router_backend_up" and sample.value == 0
    }


async def measure(url: str, load: Load, watch: DownWatch | None) -> tuple[LoadResult, float]:
    """Warm the proxy's upstream pool at this concurrency, then measure; also the client's CPU
    (cores), which must stay below one for the client not to be the limit."""
    endpoint = url + "/v1/completions"
    async with (
        client_session(load.concurrency) as client,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as scraper,
    ):
        await closed_loop(
            client,
            endpoint,
            completion_body(2, MODEL),
            2,
            load.concurrency,
            requests=load.concurrency,
        )
        watcher = asyncio.create_task(watch.watch(scraper)) if watch else None
        cpu = time.process_time()
        result = await closed_loop(
            client,
            endpoint,
            completion_body(load.tokens, MODEL),
            load.tokens,
            load.concurrency,
            requests=load.requests,
            duration_s=load.duration_s,
        )
        client_cores = (time.process_time() - cpu) / result.elapsed_s
        if watcher is not None:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
    return result, client_cores


def run_set(
    kind: str, step_ms: float, set_loads: list[Load], args: argparse.Namespace
) -> dict[str, Any]:
    out: dict[str, Any] = {"rows": [], "down_seen": [], "scrapes": 0, "scrape_failures": 0}
    with backends_and_proxies(kind, step_ms, args) as servers:
        targets = [t for t in TARGETS if t == "direct" or t in servers]
        urls = {t: servers["baseline" if t == "direct" else t].url for t in targets}
        watch = DownWatch(servers["router"].url)
        for load, round_ in itertools.product(set_loads, range(1, args.rounds + 1)):
            for target in targets:
                proc = servers["baseline" if target == "direct" else target]
                cpu = stack.cpu_seconds(proc.pid)
                result, client_cores = uvloop.run(
                    measure(urls[target], load, watch if target == "router" else None)
                )
                row = {
                    "round": round_,
                    "load": load.name,
                    "target": target,
                    **result.to_dict(),
                    "server_cpu_cores": (stack.cpu_seconds(proc.pid) - cpu) / result.elapsed_s,
                    "client_cpu_cores": client_cores,
                }
                out["rows"].append(row)
                print(_row_line(kind, row), flush=True)
        out["peak_rss_bytes"] = {
            t: stack.rss_bytes(servers[t].pid, peak=True) for t in targets if t != "direct"
        }
        out["down_seen"] = sorted(watch.down_seen)
        out["scrapes"], out["scrape_failures"] = watch.scrapes, watch.failures
    return out


def _row_line(kind: str, row: dict[str, Any]) -> str:
    return (
        f"{kind:7} {row['load']:13} {row['target']:7} ok={row['ok']} err={row['errors']} "
        f"{row['requests_per_s']:.0f} req/s TTFT p50 {row['ttft_p50_s'] * 1e3:.2f} ms "
        f"p99 {row['ttft_p99_s'] * 1e3:.1f} ms cpu {row['server_cpu_cores']:.2f} "
        f"client {row['client_cpu_cores']:.2f}"
    )


def pick(rows: list[dict[str, Any]], load: str, target: str) -> dict[str, Any] | None:
    return next((r for r in rows if r["load"] == load and r["target"] == target), None)


def ratios(rows: list[dict[str, Any]], peak_rss: dict[str, int], down: list[str]) -> list[Any]:
    """The issue's targets, each as (what, measured, target)."""

    def value(load: str, target: str, key: str) -> float:
        row = pick(rows, load, target)
        return float(row[key]) if row else math.nan

    def added_ttft(target: str) -> float:
        return value("c1", target, "ttft_p50_s") - value("c1", "direct", "ttft_p50_s")

    big = "1000 streams"
    return [
        ("c64 req/s router / floor", value("c64", "router", "requests_per_s")
         / value("c64", "floor", "requests_per_s"), ">= 0.6"),
        ("c64 req/s neuron / floor", value("c64", "neuron", "requests_per_s")
         / value("c64", "floor", "requests_per_s"), "(reference)"),
        ("c64 req/s router / neuron", value("c64", "router", "requests_per_s")
         / value("c64", "neuron", "requests_per_s"), ">= 2"),
        ("1000 streams router errors", value(big, "router", "errors"), "0"),
        ("1000 streams req/s router / direct", value(big, "router", "requests_per_s")
         / value(big, "direct", "requests_per_s"), ">= 0.8"),
        ("1000 streams TTFT p99 router / direct", value(big, "router", "ttft_p99_s")
         / value(big, "direct", "ttft_p99_s"), "<= 2"),
        ("router peak RSS MB", peak_rss.get("router", 0) / 1e6, "<= 150"),
        ("c1 added TTFT p50 floor (ms)", added_ttft("floor") * 1e3, ""),
        ("c1 added TTFT p50 router (ms)", added_ttft("router") * 1e3, ""),
        ("c1 added TTFT p50 router / floor", added_ttft("router") / added_ttft("floor"), "<= 1.1"),
        ("backends marked DOWN", ", ".join(down) or "none", "none"),
    ]  # fmt: skip


def targets(
    rows: list[dict[str, Any]], peak_rss: dict[str, int], down: list[str], rounds: int
) -> list[dict[str, Any]]:
    """Each target with its value in every round (ratios within a round are interleaved)."""
    per_round = [ratios([r for r in rows if r["round"] == n], peak_rss, down) for n in
                 range(1, rounds + 1)]  # fmt: skip
    return [
        {"what": what, "measured": [items[i][1] for items in per_round], "target": target}
        for i, (what, _, target) in enumerate(per_round[0])
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="shorter runs: under 2 minutes")
    p.add_argument(
        "--backends", help="comma-separated from zero, instant (zero,instant; quick: zero)"
    )
    p.add_argument(
        "--neuron-proxy",
        help="command line of Neuron's router, with {port}, {prefill_port}, {decode_port}, "
        "{host} filled in (without {port} it must listen on 8000)",
    )
    p.add_argument("--router-cmd", help="another router command line, same placeholders")
    p.add_argument("--rounds", type=int, help="interleaved repeats of each load (2; quick: 1)")
    p.add_argument("--step-ms", type=float, default=20.0, help="decode step at 1,000 streams")
    p.add_argument(
        "--output", type=Path, help=f"JSON file ({RESULTS.name}; quick: {RESULTS_QUICK.name})"
    )
    args = p.parse_args(argv)
    if args.rounds is None:
        args.rounds = 1 if args.quick else 2
    if args.output is None:
        args.output = RESULTS_QUICK if args.quick else RESULTS
    if args.backends is None:
        args.backends = "zero" if args.quick else "zero,instant"

    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # 1,000 streams, 2 sockets each
    somaxconn = int(Path("/proc/sys/net/core/somaxconn").read_text())
    print(f"descriptor limit {hard}, net.core.somaxconn {somaxconn}", flush=True)
    fast, paced = loads(args.quick)
    results: dict[str, Any] = {}
    started = time.monotonic()
    for kind in args.backends.split(","):
        first = run_set(kind, 0.0, fast, args)
        second = run_set(kind, args.step_ms, paced, args)
        rows = first["rows"] + second["rows"]
        peak = {t: max(first["peak_rss_bytes"][t], second["peak_rss_bytes"][t])
                for t in first["peak_rss_bytes"]}  # fmt: skip
        down = sorted(set(first["down_seen"]) | set(second["down_seen"]))
        results[kind] = {
            "rows": rows,
            "peak_rss_bytes": peak,
            "down_seen": down,
            "metrics_scrapes": first["scrapes"] + second["scrapes"],
            "metrics_scrape_failures": first["scrape_failures"] + second["scrape_failures"],
            "targets": targets(rows, peak, down, args.rounds),
        }  # fmt: skip

    for kind, res in results.items():
        print(f"\n### {kind} backends\n")
        table = [
            [r["load"], r["round"], r["target"], r["ok"], r["errors"], r["requests_per_s"],
             r["ttft_p50_s"] * 1e3, r["ttft_p99_s"] * 1e3, r["server_cpu_cores"],
             r["client_cpu_cores"]]
            for r in res["rows"]
        ]  # fmt: skip
        headers = ["load", "round", "target", "ok", "err", "req/s", "TTFT p50 ms", "TTFT p99 ms"]
        print(report.markdown_table([*headers, "server CPU", "client CPU"], table))
        print()
        rss = ", ".join(f"{t} {b / 1e6:.0f} MB" for t, b in res["peak_rss_bytes"].items())
        print(f"peak RSS: {rss}")
        print(f"router /metrics scrapes: {res['metrics_scrapes']}, "
              f"failed: {res['metrics_scrape_failures']}\n")  # fmt: skip
        print(report.markdown_table(
            ["target of issue 8", "measured", "target"],
            [[t["what"], " / ".join(report.fmt(m) for m in t["measured"]), t["target"]]
             for t in res["targets"]],
        ))  # fmt: skip
    report.write_json(
        args.output,
        {
            "benchmark": "router_load",
            "environment": {**report.environment(), "somaxconn": somaxconn, "nofile": hard},
            "quick": args.quick,
            "neuron_proxy": args.neuron_proxy,
            "router_cmd": args.router_cmd,
            "step_ms": args.step_ms,
            "wall_s": time.monotonic() - started,
            "results": results,
        },
    )
    print(f"\nwrote {args.output} in {time.monotonic() - started:.0f} s")
    direct_errors = sum(
        r["errors"] for res in results.values() for r in res["rows"] if r["target"] == "direct"
    )
    return 1 if direct_errors else 0  # the client itself must never be the failure


if __name__ == "__main__":
    sys.exit(main())
