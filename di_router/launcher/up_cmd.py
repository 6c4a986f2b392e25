"""`di-router up`: prefill, decode and router on one host, what the tutorial did in three terminals.

The supervisor is all-or-nothing: a half-started DI pair blocks in its KV handshake and a router
without both servers fails every request, so any child dying, a health wait running out or a
signal stops everything.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shlex
import signal
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path

import httpx

from di_router.argv import router_argv
from di_router.launcher.ports import ALL_INTERFACES, ensure_ports_free
from di_router.launcher.router_config import (
    router_host,
    router_table,
    write_router_config,
)
from di_router.launcher.router_options import (
    add_router_options,
    check_router_argv,
    router_options,
)
from di_router.launcher.serve_cmd import SERVE_OPTIONS
from di_router.launcher.server_plan import LOOPBACK, plan_server
from di_router.launcher.settings import Settings, add_options, run

UP_OPTIONS = (
    *(name for name in SERVE_OPTIONS if name not in ("baseline_port", "host")),
    "pairs",
    "router_host",
    "router_port",
    "router_config_file",
    "ready_timeout",
)
DEFAULT_READY_TIMEOUT = {"sim": 60.0, "vllm": 1800.0}
"""A 70B model takes minutes to load on Trainium; the simulator takes seconds."""
HANDSHAKE_MARKERS = ("KV handshake:", "initialize recv buffer", "initialize send buffer")
"""Log lines about pairing over the KV side channel: the simulator's, and vLLM's
(`NeuronBuffer.__init__` logs "initialize recv buffer" and then blocks in the handshake)."""
STOP_GRACE_S = 10.0
HEALTH_POLL_INTERVAL_S = 0.2
LINE_LIMIT = 1 << 20


@dataclass(frozen=True)
class ChildSpec:
    name: str
    argv: list[str]
    env: dict[str, str]
    health_url: str
    listen_ports: dict[str, int]


def _reachable(host: str) -> str:
    """Where this host reaches a listener bound to `host` (a wildcard is reached on loopback)."""
    return LOOPBACK if host in ("", ALL_INTERFACES, "::") else host


def router_url(settings: Settings, tls: bool) -> str:
    scheme = "https" if tls else "http"
    return f"{scheme}://{_reachable(router_host(settings))}:{settings.router_port}"


def child_specs(settings: Settings, router_config: Path, tls: bool = False) -> list[ChildSpec]:
    """The servers this host runs, then the router in front of every pair, reading the config
    file `up` wrote for them (`router_config.py`; its own --host/--port flags keep a stray
    `DI_ROUTER_HOST`/`_PORT` from moving it away from where `up` checks its health).

    single-instance: each pair's prefill and decode, bound to loopback, router on loopback.
    multi-instance: this is the prefill host: its prefill server and the router (all interfaces);
    the decode host runs `di-router serve decode` with the same settings."""
    if settings.single_instance:
        settings = replace(settings, host=LOOPBACK)
        roles: tuple[str, ...] = ("prefill", "decode")
    else:
        roles = ("prefill",)
    specs = []
    for pair in range(settings.pairs):
        for role in roles:
            plan = plan_server(role, settings, pair)
            name = role if settings.pairs == 1 else f"{role}{pair}"
            health = f"http://{_reachable(settings.host or ALL_INTERFACES)}:{plan.port}/health"
            specs.append(ChildSpec(name, plan.argv, plan.env, health, plan.listen_ports))
    config = ["--config", str(router_config)]
    argv = router_argv(router_host(settings), settings.router_port, [], config)
    check_router_argv(argv[3:])
    ports = {"--router-port": settings.router_port}
    health = router_url(settings, tls) + "/health"
    return [*specs, ChildSpec("router", argv, {}, health, ports)]


def log(message: str, name: str = "up") -> None:
    sys.stdout.write(f"[{name}] {message}\n")
    sys.stdout.flush()


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        return f"was killed by {signal.Signals(-returncode).name}"
    return f"exited with code {returncode}"


class Supervisor:
    def __init__(
        self,
        specs: list[ChildSpec],
        ready_timeout: float,
        on_ready: Callable[[], None] | None = None,
    ) -> None:
        self.specs = specs
        self.ready_timeout = ready_timeout
        self.on_ready = on_ready
        self.children: dict[str, asyncio.subprocess.Process] = {}
        self.pumps: list[asyncio.Task[None]] = []
        self.healthy: set[str] = set()
        self.handshake: dict[str, str] = {}
        """Each child's last line about the KV handshake: why a server is not up yet."""
        self.stop = asyncio.Event()
        self.stop_signal: str | None = None

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._request_stop, sig)
        try:
            # Prefill and decode handshake with each other, so they must start together.
            for group in (self.specs[:-1], self.specs[-1:]):
                for spec in group:
                    await self._start(spec)
                status = await self._until(self._all_healthy(group), group)
                if status is not None:
                    return status
            base = self.specs[-1].health_url.removesuffix("/health")
            log(f"ready: send requests to {base}/v1/completions")
            if self.on_ready is not None:
                self.on_ready()
            status = await self._until(None, [])
            assert status is not None  # without a goal, only a child exit or a signal ends it
            return status
        finally:
            await self._stop_all()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)

    def _request_stop(self, sig: signal.Signals) -> None:
        self.stop_signal = sig.name
        self.stop.set()

    async def _start(self, spec: ChildSpec) -> None:
        process = await asyncio.create_subprocess_exec(
            *spec.argv,
            env={**os.environ, **spec.env, "PYTHONUNBUFFERED": "1"},
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,  # our own Ctrl-C handling decides the stop order
            limit=LINE_LIMIT,
        )
        self.children[spec.name] = process
        self.pumps.append(asyncio.create_task(self._pump(spec.name, process)))
        log(f"started {spec.name} (pid {process.pid}): {shlex.join(spec.argv)}")

    async def _pump(self, name: str, process: asyncio.subprocess.Process) -> None:
        assert process.stdout is not None
        async for line in process.stdout:
            text = line.decode(errors="replace").rstrip("\r\n")
            if any(marker in text for marker in HANDSHAKE_MARKERS):
                self.handshake[name] = text
            log(text, name)

    async def _all_healthy(self, group: list[ChildSpec]) -> None:
        # Liveness of children we started, on this host: a router with its own TLS certificate
        # is checked without verifying it (no data is exchanged).
        async with httpx.AsyncClient(timeout=2.0, trust_env=False, verify=False) as client:
            await asyncio.gather(*(self._healthy(spec, client) for spec in group))

    async def _healthy(self, spec: ChildSpec, client: httpx.AsyncClient) -> None:
        while True:
            with contextlib.suppress(httpx.TransportError):
                if (await client.get(spec.health_url)).status_code == 200:
                    self.healthy.add(spec.name)
                    log(f"{spec.name} is healthy ({spec.health_url})")
                    return
            await asyncio.sleep(HEALTH_POLL_INTERVAL_S)

    async def _until(self, goal: Awaitable[None] | None, group: list[ChildSpec]) -> int | None:
        """Wait for `goal` (forever when None); None when it completes, else up's exit status."""
        exits = {asyncio.ensure_future(p.wait()): name for name, p in self.children.items()}
        stopped = asyncio.ensure_future(self.stop.wait())
        goal_task = asyncio.ensure_future(goal) if goal is not None else None
        waiting = [*exits, stopped, *([goal_task] if goal_task else [])]
        timeout = self.ready_timeout if goal is not None else None
        done, pending = await asyncio.wait(
            waiting, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
        )
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for task, name in exits.items():
            if task in done:
                log(f"{name} {describe_exit(task.result())}; stopping the others")
                return 1
        if stopped in done:
            log(f"received {self.stop_signal}; stopping")
            return 0
        if goal_task in done:
            goal_task.result()
            return None
        late = [f"{s.name} ({s.health_url})" for s in group if s.name not in self.healthy]
        log(
            f"{', '.join(late)} did not become healthy within {self.ready_timeout:g} s "
            "(--ready-timeout); see its log lines above. Stopping everything"
        )
        for spec in group:
            if spec.name not in self.healthy and spec.name in self.handshake:
                # Neither server binds HTTP before the pair is made: say where it is stuck.
                line = self.handshake[spec.name]
                log(f"{spec.name} never paired over the KV side channel: {line}")
        return 1

    async def _stop_all(self) -> None:
        """SIGTERM every child's process group (vLLM spawns workers), SIGKILL stragglers."""
        for process in self.children.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
        for name, process in self.children.items():
            try:
                await asyncio.wait_for(process.wait(), STOP_GRACE_S)
            except TimeoutError:
                log(f"{name} ignored SIGTERM for {STOP_GRACE_S:g} s; killing it")
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                await process.wait()
        if self.pumps:
            await asyncio.wait(self.pumps, timeout=STOP_GRACE_S)


def up(
    args: argparse.Namespace, settings: Settings, on_ready: Callable[[], None] | None = None
) -> int:
    options = router_options(args)
    path = write_router_config(router_table(settings, options), settings.router_config_file)
    log(f"router config: {path} (`neuron-proxy-server --config {path}` serves these pairs)")
    specs = child_specs(settings, path, tls="ssl-certfile" in options)
    ensure_ports_free({flag: port for spec in specs for flag, port in spec.listen_ports.items()})
    timeout = settings.ready_timeout or DEFAULT_READY_TIMEOUT[settings.engine]
    return asyncio.run(Supervisor(specs, timeout, on_ready).run())


def build_parser() -> argparse.ArgumentParser:
    """`up`'s options alone, for commands (like `demo`) that start the stack themselves."""
    parser = argparse.ArgumentParser(prog="di-router up")
    add_options(parser, UP_OPTIONS)
    add_router_options(parser)
    return parser


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "up",
        help="start the servers of this host and the router in front of them",
        description="single-instance: start every pair's prefill and decode (--pairs) and the "
        "router on 127.0.0.1; multi-instance: start this prefill host's server and the router on "
        "all interfaces (the decode host runs `di-router serve decode`). Wait until each is "
        "healthy, prefix their log lines, and stop all of them on Ctrl-C/SIGTERM or when one dies.",
    )
    add_options(parser, UP_OPTIONS)
    add_router_options(parser)
    parser.set_defaults(func=run("up", up))
