"""`di-router up --engine sim`: the whole single-instance launch path, end to end."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import threading
from collections.abc import Iterator

import httpx
import pytest

from tests.launcher.launcher_helpers import (
    alive,
    free_port,
    launcher_argv,
    launcher_env,
    wait_until,
)
from tests.support import start_sim

MODEL = "llama-3.3-70b"
CHILDREN = ("prefill", "decode", "router")


class Up:
    """A running `di-router up` whose output lines are collected as they arrive."""

    def __init__(self, *extra: str) -> None:
        self.router_port = free_port()
        self._start(
            "up", "--engine", "sim", "--model-path", MODEL,
            "--prefill-port", str(free_port()), "--decode-port", str(free_port()),
            "--router-port", str(self.router_port), "--kv-port", str(free_port()),
            "--ready-timeout", "30", *extra,
        )  # fmt: skip

    def _start(self, *args: str) -> None:
        argv = launcher_argv(*args)
        self.proc = subprocess.Popen(
            argv, env=launcher_env(), text=True, start_new_session=True,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )  # fmt: skip
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_for_line(self, text: str, timeout: float = 45) -> None:
        def seen() -> bool:
            if any(text in line for line in self.lines):
                return True
            assert self.proc.poll() is None, f"up exited early:\n{self.output()}"
            return False

        wait_until(seen, timeout, f"{text!r} in up's output")

    def wait_exit(self, timeout: float = 30) -> int:
        code = self.proc.wait(timeout)
        self._reader.join(5)
        return code

    def pids(self) -> dict[str, int]:
        found = (re.match(r"\[up\] started (\w+) \(pid (\d+)\)", line) for line in self.lines)
        return {m[1]: int(m[2]) for m in found if m}

    def cleanup(self) -> None:
        for pid in [*self.pids().values(), self.proc.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)


@contextlib.contextmanager
def up(*extra: str) -> Iterator[Up]:
    running = Up(*extra)
    try:
        yield running
    finally:
        running.cleanup()


def stream_completion(port: int) -> list[str]:
    body = {"model": MODEL, "prompt": "a tornado is a", "max_tokens": 10, "stream": True}
    with httpx.stream(
        "POST", f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=30, trust_env=False
    ) as response:
        assert response.status_code == 200
        return [line for line in response.iter_lines() if line.startswith("data: ")]


def test_up_serves_a_streaming_request_and_stops_all_when_one_child_dies() -> None:
    with up("--sim-profile", "instant") as running:
        running.wait_for_line("[up] ready")
        pids = running.pids()
        assert set(pids) == set(CHILDREN)
        for name in CHILDREN:  # every child's own log lines, prefixed with its name
            assert any(line.startswith(f"[{name}] ") for line in running.lines), name
            assert f"[up] {name} is healthy" in running.output()

        events = stream_completion(running.router_port)
        assert events[-1] == "data: [DONE]"
        assert len(events) >= 3  # the prefill's first token, decode tokens, [DONE]

        os.kill(pids["decode"], signal.SIGKILL)
        assert running.wait_exit() != 0
        assert "[up] decode was killed by SIGKILL; stopping the others" in running.output()
        for name in ("prefill", "router"):
            assert not alive(pids[name]), f"{name} still running after decode died"


def test_sigterm_stops_every_child_cleanly() -> None:
    with up("--sim-profile", "instant") as running:
        running.wait_for_line("[up] ready")
        pids = running.pids()
        running.proc.send_signal(signal.SIGTERM)
        assert running.wait_exit() == 0
        assert "[up] received SIGTERM; stopping" in running.output()
        for name, pid in pids.items():
            assert not alive(pid), f"{name} still running after SIGTERM"


def test_a_server_that_fails_to_start_stops_the_others() -> None:
    """An unknown simulator profile makes the servers exit at once, before becoming healthy."""
    with up("--sim-profile", "no-such-profile") as running:
        code = running.wait_exit()
        output = running.output()
        assert code == 1, output
        assert re.search(r"\[up\] (prefill|decode) exited with code 2; stopping the others", output)
        assert "invalid choice: 'no-such-profile'" in output  # the child's own error, prefixed
        assert "router" not in running.pids()
        for name, pid in running.pids().items():
            assert not alive(pid), f"{name} still running"


def test_up_multi_instance_needs_both_host_ips() -> None:
    argv = launcher_argv(
        "up", "--engine", "sim", "--model-path", MODEL, "--topology", "multi-instance"
    )
    result = subprocess.run(
        argv,
        env=launcher_env(), capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 2
    assert "--prefill-ip is required for multi-instance" in result.stderr


def test_health_wait_is_bounded_and_names_what_did_not_come_up() -> None:
    # 10 ms is far less than a Python interpreter needs to start, let alone serve /health.
    with up("--sim-profile", "instant", "--ready-timeout", "0.01") as running:
        code = running.wait_exit()
        output = running.output()
        assert code == 1, output
        assert re.search(
            r"\[up\] prefill \(http://127\.0\.0\.1:\d+/health\), decode \(http://127\.0\.0\.1:\d+"
            r"/health\) did not become healthy within 0\.01 s \(--ready-timeout\)",
            output,
        ), output
        for name, pid in running.pids().items():
            assert not alive(pid), f"{name} still running"


def test_a_decode_server_that_never_pairs_is_reported_with_the_reason() -> None:
    """A stale consumer (an earlier stack's decode server, still retrying) pairs with the new
    prefill server first; the new decode is refused and never binds HTTP. `up` says why."""
    kv_port = free_port()
    stale = start_sim("decode", kv_port=kv_port, name="stale-decode")
    try:
        wait_until(lambda: "KV handshake" in stale.log(), 20, "the stale decode retrying")
        with up("--sim-profile", "instant", "--kv-port", str(kv_port), "--ready-timeout", "5") as u:
            wait_until(
                lambda: u.proc.poll() is not None or any("[up] ready" in ln for ln in u.lines),
                40, "up to give up or be ready",
            )  # fmt: skip
            if u.proc.poll() is None:  # both consumers raced for the producer; ours won
                pytest.skip("the new decode server paired before the stale one: nothing to report")
            assert u.wait_exit() == 1
            output = u.output()
        assert "[up] prefill is healthy" in output, output
        assert re.search(
            r"\[up\] decode never paired over the KV side channel: .*KV handshake: waiting to "
            rf"pair with the producer at 127\.0\.0\.1:{kv_port} \(kv_ip:kv_port\): refused: this "
            r"producer is already paired with the consumer at 127\.0\.0\.1:\d+",
            output,
        ), output
    finally:
        stale.stop()
