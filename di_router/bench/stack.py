"""Start simulator servers and the router as real subprocesses on free loopback ports.

Benchmarks and tests need the exact processes a user runs (`python -m di_router.sim.api_server`,
`python -m di_router.router.cli`), not in-process apps, so that the measured cost includes the
real HTTP stack and the router's own process can be inspected (RSS, CPU).
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from di_router import argv
from di_router.sim.cli import role_kv_config

MODEL = "llama-3.3-70b"
HOST = "127.0.0.1"
READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
_SECOND_SIGNAL_AFTER_S = 0.1
"""A process still running this long after a signal has taken it: another one counts as a
second."""


class StackError(RuntimeError):
    """A server of the stack exited or never became ready; the message holds its log tail."""


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


_EPHEMERAL = _ephemeral_range()
_handed_out: set[int] = set()


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("0.0.0.0", port))  # conflicts with a listener on any address
        except OSError:
            return False
    return True


def free_port(consecutive: int = 1) -> int:
    """A free port (the first of `consecutive` free ones) outside the kernel's ephemeral range.

    A port from the ephemeral range (a bind to port 0) can be taken by any outgoing connection
    before the server binds it, and a server restarted on its old port finds it gone; below the
    range only listeners compete, and each port is handed out once per process.
    """
    low, high = (1024, _EPHEMERAL[0] - 1) if _EPHEMERAL[0] > 11024 else (_EPHEMERAL[1] + 1, 65535)
    rng = random.Random()
    for _ in range(500):
        port = rng.randrange(max(low, 10000), high - consecutive)
        ports = range(port, port + consecutive)
        if _handed_out.isdisjoint(ports) and all(map(_bindable, ports)):
            _handed_out.update(ports)
            return port
    raise RuntimeError(f"no {consecutive} free consecutive ports in {low}-{high}")


class Server:
    """One server subprocess in its own session (stopping it stops what it spawned too)."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        url: str,
        env: Mapping[str, str] | None = None,
        log_path: Path | None = None,
    ) -> None:
        self.name = name
        self.url = url
        if log_path is None:
            fd, raw_path = tempfile.mkstemp(prefix=f"{name}-", suffix=".log")
            os.close(fd)
            log_path = Path(raw_path)
        self.log_path = log_path
        with log_path.open("wb") as log:
            self.popen = subprocess.Popen(
                list(argv),
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **env} if env else None,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, chars: int = 4000) -> str:
        return self.log()[-chars:]

    def wait_ready(self, path: str = "/health", timeout: float = READY_TIMEOUT_S) -> Server:
        wait_ready([self], path, timeout)
        return self

    def stop(
        self, sig: int = signal.SIGTERM, timeout_s: float = STOP_TIMEOUT_S, now: bool = False
    ) -> int:
        """Signal the process group (SIGTERM: graceful), SIGKILL if it does not exit in time.
        `now` signals again if it has not exited a moment later (two signals sent together
        arrive as one), as an operator's second Ctrl-C: the router then ends what it was still
        draining or settling at once."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, sig)
            try:
                if now:
                    try:
                        self.popen.wait(_SECOND_SIGNAL_AFTER_S)
                    except subprocess.TimeoutExpired:
                        with contextlib.suppress(ProcessLookupError):
                            os.killpg(self.popen.pid, sig)
                self.popen.wait(timeout_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(timeout_s)
        return self.popen.returncode


@dataclass
class Stack:
    """What a client needs: `url` to send requests to, plus every server behind it by name."""

    url: str
    servers: dict[str, Server] = field(default_factory=dict)

    @property
    def urls(self) -> dict[str, str]:
        return {name: server.url for name, server in self.servers.items()}

    @property
    def router(self) -> Server | None:
        return self.servers.get("router")


def rss_bytes(pid: int, peak: bool = False) -> int:
    """Resident set size of a live process (VmRSS in /proc/<pid>/status), in bytes; with
    `peak`, the most it has had since it started (VmHWM), which no sampling interval misses."""
    key = "VmHWM:" if peak else "VmRSS:"
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) * 1024
    raise LookupError(f"no {key} for pid {pid}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a live process has used so far (/proc/<pid>/stat)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()  # the command name may contain spaces
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def sim_argv(
    role: str, port: int, kv_port: int, profile: str, batch: int, extra: Sequence[str] = ()
) -> list[str]:
    """The simulator's command line for one role on loopback (the launcher's builder)."""
    return argv.server_argv(
        "sim",
        model=MODEL,
        port=port,
        host=HOST,
        kv_config=role_kv_config(role, HOST, kv_port),
        vllm_flags=["--max-num-seqs", str(batch)],
        extra=["--sim-profile", profile, *extra],
    )


def router_argv(
    port: int, prefill_port: int, decode_port: int, extra: Sequence[str] = ()
) -> list[str]:
    """The router on loopback in front of one pair, given as Neuron's router takes it, so that
    backends named in `extra` (`--prefill`, `--decode`, `--etcd`) replace it as they would."""
    pair = ["--prefill-ip", HOST, "--prefill-port", str(prefill_port)]
    pair += ["--decode-ip", HOST, "--decode-port", str(decode_port)]
    return argv.router_argv(HOST, port, [], [*pair, *extra])


class _Group:
    """Servers started one by one into a shared log directory and stopped together."""

    def __init__(self) -> None:
        self.log_dir = Path(tempfile.mkdtemp(prefix="di-router-bench-"))
        self.servers: dict[str, Server] = {}

    def start(self, name: str, argv: Sequence[str], url: str) -> Server:
        server = Server(name, argv, url, log_path=self.log_dir / f"{name}.log")
        self.servers[name] = server
        return server


@contextlib.contextmanager
def _group() -> Iterator[_Group]:
    """Always stop every server (in reverse start order); keep the logs only on failure."""
    group = _Group()
    failed = False
    try:
        yield group
    except BaseException:
        failed = True
        raise
    finally:
        for server in reversed(list(group.servers.values())):
            server.stop()
        if not failed:
            shutil.rmtree(group.log_dir, ignore_errors=True)


def wait_ready(servers: Sequence[Server], path: str, timeout_s: float = READY_TIMEOUT_S) -> None:
    """Bounded poll until every server answers 200 on `path`; fail fast if one exits."""
    deadline = time.monotonic() + timeout_s
    pending = list(servers)
    with httpx.Client(timeout=1.0) as client:
        while pending:
            for server in list(pending):
                if server.popen.poll() is not None:
                    raise StackError(
                        f"{server.name} exited with {server.popen.returncode}:\n"
                        + server.log_tail()
                    )
                with contextlib.suppress(httpx.HTTPError):
                    if client.get(server.url + path).status_code == 200:
                        pending.remove(server)
            if not pending:
                return
            if time.monotonic() > deadline:
                names = ", ".join(f"{s.name} ({s.url}{path})" for s in pending)
                tails = "\n".join(f"--- {s.name}\n{s.log_tail(1500)}" for s in pending)
                raise StackError(f"not ready after {timeout_s}s: {names}\n{tails}")
            time.sleep(0.05)


@contextlib.contextmanager
def baseline(
    profile: str = "instant",
    batch: int = 256,
    sim_args: Sequence[str] = (),
    ready_timeout_s: float = READY_TIMEOUT_S,
) -> Iterator[Stack]:
    """One colocated (non-DI) simulator: the direct path a DI deployment is compared with."""
    port = free_port()
    url = f"http://{HOST}:{port}"
    with _group() as group:
        server = group.start(
            "baseline", sim_argv("baseline", port, free_port(), profile, batch, sim_args), url
        )
        wait_ready([server], "/health", ready_timeout_s)
        yield Stack(url, dict(group.servers))


@contextlib.contextmanager
def di(
    profile: str = "instant",
    batch: int = 256,
    sim_args: Sequence[str] = (),
    router_args: Sequence[str] = (),
    ready_timeout_s: float = READY_TIMEOUT_S,
) -> Iterator[Stack]:
    """1P1D: prefill + decode simulators sharing a KV port, and the router in front of them.

    The router starts once both backends are healthy and counts as ready when its `/ready` is
    200 (it has seen both backends healthy itself), so no request races its health monitor.
    """
    kv_port, p_port, d_port, r_port = (free_port() for _ in range(4))
    with _group() as group:
        backends = [
            group.start(
                role,
                sim_argv(role, port, kv_port, profile, batch, sim_args),
                f"http://{HOST}:{port}",
            )
            for role, port in (("prefill", p_port), ("decode", d_port))
        ]
        wait_ready(backends, "/health", ready_timeout_s)
        router = group.start(
            "router", router_argv(r_port, p_port, d_port, router_args), f"http://{HOST}:{r_port}"
        )
        wait_ready([router], "/ready", ready_timeout_s)
        yield Stack(router.url, dict(group.servers))
