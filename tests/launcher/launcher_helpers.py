"""Shared helpers for the launcher tests: the CLI as `di-router` wires it, ports, waits."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import httpx

from di_router.cli import build_parser
from di_router.launcher.settings import Settings, resolve
from di_router.settings import LAUNCH_PREFIX, ROUTER_PREFIX, SIM_PREFIX
from tests.support import free_port, wait_until  # noqa: F401  (re-exported for the tests)

REPO = Path(__file__).resolve().parents[2]


def parse(argv: Sequence[str], environ: Mapping[str, str] | None = None) -> tuple:
    """(args, Settings) for a command line, with an explicit environment (default: none)."""
    args = build_parser().parse_args(list(argv))
    return args, resolve(args, {} if environ is None else environ)


def settings(argv: Sequence[str], environ: Mapping[str, str] | None = None) -> Settings:
    return parse(argv, environ)[1]


def launcher_env(**extra: str) -> dict[str, str]:
    """The test process's environment minus every program's settings variables, so only each
    test's settings apply."""
    prefixes = (ROUTER_PREFIX, SIM_PREFIX, LAUNCH_PREFIX)
    env = {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}
    env["PYTHONPATH"] = str(REPO)
    env["PYTHONUNBUFFERED"] = "1"
    return env | extra


def launcher_argv(*argv: str) -> list[str]:
    """`di-router ...` as the installed console script runs it."""
    return [sys.executable, "-m", "di_router.cli", *argv]


def run_launcher(*argv: str, timeout: float = 30, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        launcher_argv(*argv),
        env=launcher_env(**env),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )


def healthy(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200
    except httpx.TransportError:
        return False


def alive(pid: int) -> bool:
    """True while `pid` runs (a zombie counts as dead: it no longer holds ports or cores)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"
