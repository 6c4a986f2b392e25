"""`di-router doctor`: each finding triggered for real, and gone when the cause is."""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
from pathlib import Path

import pytest

from di_router.launcher.doctor import check_kv_lock
from tests.launcher.launcher_helpers import free_port, run_launcher, settings, wait_until
from tests.support import start_sim

NOBODY = 65534


def lock_check_as(uid: int, lock: Path) -> list:
    """Run the doctor's lock check in a forked child that has dropped to `uid`."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        status = 1
        try:
            os.close(read_end)
            os.setgid(uid)
            os.setuid(uid)
            found = check_kv_lock(settings(["doctor", "--kv-lock-file", str(lock)]))
            os.write(write_end, json.dumps([[f.problem, f.fix] for f in found]).encode())
            status = 0
        finally:
            os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        output = pipe.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    return json.loads(output)


@pytest.fixture
def lock_dir():
    """A folder every user can enter, as /tmp is (pytest's tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="di-doctor-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


@pytest.mark.skipif(os.geteuid() != 0, reason="creating another user's file needs root")
def test_lock_file_of_another_user_is_reported_with_the_fix(lock_dir) -> None:
    lock = lock_dir / "nrt_kv_store_server.lock"
    lock.touch(mode=0o600)  # left behind by root; nobody cannot open it
    findings = lock_check_as(NOBODY, lock)
    assert len(findings) == 1
    problem, fix = findings[0]
    assert f"{lock} belongs to root (uid 0)" in problem
    assert "Permission denied" in problem
    assert fix == f"once no DI server is running: sudo rm {lock}"
    # Once the file is usable by everyone (or gone) the finding disappears.
    lock.chmod(0o666)
    assert lock_check_as(NOBODY, lock) == []
    lock.unlink()
    assert lock_check_as(NOBODY, lock) == []


def test_busy_port_is_reported_with_its_flag(tmp_path) -> None:
    ports = {flag: free_port() for flag in ("--decode-port", "--router-port", "--kv-port")}
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_launcher(
            "doctor", "--engine", "sim", "--prefill-port", str(port),
            *(str(v) for pair in ports.items() for v in pair),
        )  # fmt: skip
    assert result.returncode == 1
    assert f"FAIL  ports: --prefill-port {port} is already in use on this host" in result.stdout
    assert "choose another port with --prefill-port" in result.stdout
    assert "--decode-port" not in result.stdout
    # Same settings once the port is released: healthy.
    released = run_launcher(
        "doctor", "--engine", "sim", "--prefill-port", str(port),
        *(str(v) for pair in ports.items() for v in pair),
    )  # fmt: skip
    assert released.returncode == 0, released.stdout
    assert "all checks passed" in released.stdout


def artifacts_lines(stdout: str) -> list[str]:
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if "compiled artifacts" in line)
    return [lines[start], *[line for line in lines[start + 1 : start + 2] if "fix:" in line]]


def test_missing_or_mismatched_artifacts_folder(tmp_path) -> None:
    compiled = tmp_path / "di_traced_model_tp32_b4"
    common = ["doctor", "--model-path", str(tmp_path), "--compiled-model-path", str(compiled)]
    missing = run_launcher(*common)
    assert missing.returncode == 1
    first, fix = artifacts_lines(missing.stdout)
    assert f"FAIL  compiled artifacts: --compiled-model-path {compiled} does not exist" in first
    assert f"di-router compile --model-path {tmp_path} --tp-degree 32 --batch-size 4" in fix

    compiled.mkdir()
    (compiled / "neuron_config.json").write_text(
        json.dumps({"neuron_config": {"tp_degree": 64, "batch_size": 8}})
    )
    mismatched = run_launcher(*common)
    first, fix = artifacts_lines(mismatched.stdout)
    assert "was compiled for tp_degree 64, batch_size 8" in first
    assert "--tp-degree 32 --batch-size 4" in first
    assert "--compiled-model-path di_traced_model_tp64_b8/" in fix

    (compiled / "neuron_config.json").write_text(
        json.dumps({"neuron_config": {"tp_degree": 32, "batch_size": 4}})
    )
    matching = run_launcher(*common)
    assert "  ok    compiled artifacts" in matching.stdout
    assert "  ok    model" in matching.stdout


def test_trainium_checks_report_what_this_host_lacks() -> None:
    """This machine has no EFA device and no Neuron SDK: both are real findings here."""
    result = run_launcher("doctor", "--model-path", "/nonexistent/model")
    assert result.returncode == 1
    assert "FAIL  efa: no EFA device" in result.stdout
    assert "FAIL  packages: vllm (Neuron fork) is not importable" in result.stdout
    assert "FAIL  packages: neuronx-cc is not importable" in result.stdout
    assert "FAIL  model: --model-path /nonexistent/model is not a folder" in result.stdout


def test_core_layout_problems_are_findings() -> None:
    result = run_launcher(
        "doctor", "--engine", "sim", "--prefill-cores", "0-31", "--decode-cores", "16-47"
    )
    assert result.returncode == 1
    assert "FAIL  cores: --prefill-cores 0-31 and --decode-cores 16-47 overlap" in result.stdout


def test_inherited_core_range_on_multi_instance_is_a_finding() -> None:
    argv = ["doctor", "--engine", "sim", "--topology", "multi-instance"]
    result = run_launcher(*argv, NEURON_RT_VISIBLE_CORES="32-63")
    assert "FAIL  cores: this shell exports NEURON_RT_VISIBLE_CORES" in result.stdout
    assert "Set neuron_core_offset to 32" in result.stdout


def _doctor_on_a_decode_host(kv_port: int):
    ports = {flag: free_port() for flag in ("--prefill-port", "--decode-port", "--router-port")}
    return run_launcher(
        "doctor", "--engine", "sim", "--topology", "multi-instance",
        "--prefill-ip", "127.0.0.1", "--kv-port", str(kv_port),
        *(str(v) for pair in ports.items() for v in pair),
    )  # fmt: skip


def test_unreachable_kv_producer_is_reported_with_the_reason() -> None:
    """A consumer whose kv_ip:kv_port reaches no producer never becomes healthy (it waits to
    pair forever): the doctor says so before launch."""
    kv_port = free_port()
    result = _doctor_on_a_decode_host(kv_port)
    assert result.returncode == 1
    assert (
        f"FAIL  kv peer: the decode server cannot reach its KV producer at 127.0.0.1:{kv_port} "
        "(kv_ip:kv_port): connection refused" in result.stdout
    ), result.stdout
    assert "check --prefill-ip and --kv-port" in result.stdout


def _accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def test_a_listening_kv_producer_passes() -> None:
    """A real prefill simulator, still waiting for its consumer (it binds HTTP only once
    paired), already listens on its KV port; the probe does not take its one pairing."""
    kv_port = free_port()
    prefill = start_sim("prefill", kv_port=kv_port)
    try:
        wait_until(lambda: _accepts(kv_port), 15, "the producer's KV port")
        result = _doctor_on_a_decode_host(kv_port)
        assert "ok    kv peer" in result.stdout, result.stdout
        decode = start_sim("decode", kv_port=kv_port)  # and a real consumer still pairs
        try:
            decode.wait_ready()
        finally:
            decode.stop()
    finally:
        prefill.stop()
