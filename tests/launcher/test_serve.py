"""`di-router serve`: the dry-run script really runs, and serve really execs the server."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from di_router.launcher.server_plan import plan_server
from di_router.launcher.shell import render_script
from tests.launcher.launcher_helpers import (
    alive,
    free_port,
    healthy,
    launcher_argv,
    launcher_env,
    run_launcher,
    settings,
    wait_until,
)

AWKWARD_MODEL = """/models/it's a "model" $HOME `x`"""
DUMP = "import json, os, sys; print(json.dumps({'argv': sys.argv[1:], 'env': dict(os.environ)}))"


def test_script_quoting_survives_bash(tmp_path) -> None:
    """Run the rendered script with a stand-in interpreter that reports what it received."""
    plan = plan_server("decode", settings(["serve", "decode", "--model-path", AWKWARD_MODEL]))
    script = tmp_path / "decode.sh"
    script.write_text(render_script([sys.executable, "-c", DUMP, *plan.argv[3:]], plan.env, "t"))
    result = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    received = json.loads(result.stdout)
    assert received["argv"] == plan.argv[3:]
    assert {k: received["env"][k] for k in plan.env} == plan.env


def test_sim_dry_run_script_starts_a_working_server(tmp_path) -> None:
    port = free_port()
    result = run_launcher(
        "serve", "baseline", "--engine", "sim", "--sim-profile", "instant",
        "--model-path", "llama", "--baseline-port", str(port), "--host", "127.0.0.1", "--dry-run",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "export NEURON_RT_VISIBLE_CORES=0-31" in result.stdout
    script = tmp_path / "baseline.sh"
    script.write_text(result.stdout)
    server = subprocess.Popen(
        ["bash", str(script)], env=launcher_env(), start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_until(lambda: healthy(port) or server.poll() is not None, 30, "baseline /health")
        assert server.poll() is None, "the script's server exited"
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(15)


def test_serve_execs_the_server_in_its_own_process() -> None:
    port = free_port()
    proc = subprocess.Popen(
        launcher_argv(
            "serve", "baseline", "--engine", "sim", "--sim-profile", "instant",
            "--model-path", "llama", "--baseline-port", str(port), "--host", "127.0.0.1",
        ),
        env=launcher_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_until(lambda: healthy(port) or proc.poll() is not None, 30, "serve's /health")
        assert proc.poll() is None
        # exec: the launcher's pid now runs the simulator, with the planned environment.
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0")
        assert b"di_router.sim.api_server" in cmdline
        environ = Path(f"/proc/{proc.pid}/environ").read_bytes().split(b"\0")
        assert b"NEURON_RT_VISIBLE_CORES=0-31" in environ
        proc.send_signal(signal.SIGTERM)  # goes straight to the server
        proc.wait(15)
        assert not alive(proc.pid)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_serve_refuses_a_busy_port() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_launcher(
            "serve", "prefill", "--engine", "sim", "--model-path", "llama",
            "--prefill-port", str(port), "--kv-port", str(free_port()),
        )  # fmt: skip
    assert result.returncode == 2
    assert f"--prefill-port {port} is already in use" in result.stderr
    assert "choose another port with --prefill-port" in result.stderr


def test_help_lists_environment_names() -> None:
    result = run_launcher("serve", "--help")
    assert result.returncode == 0
    assert "DI_LAUNCH_TP_DEGREE" in result.stdout
