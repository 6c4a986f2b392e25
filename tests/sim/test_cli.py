"""The drop-in CLI: vLLM's flags as the Neuron tutorial passes them, KV config validation, roles."""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
import pytest

from di_router.sim import api_server
from di_router.sim.args import parse_settings
from di_router.sim.cli import role_argv
from di_router.sim.engine import Role
from tests.sim.conftest import COMPLETIONS, completion_body, paired, post, sim_proc, texts
from tests.support import Proc, free_port, running, sim_stats

TUTORIAL_MODEL = "/models/Llama-3.3-70B-Instruct"


def _neuron(**fields: object) -> str:
    base = {"kv_connector": "NeuronConnector", "kv_role": "kv_producer", "kv_parallel_size": 2}
    return json.dumps({**base, **fields})


# -- flag and config errors ----------------------------------------------------------------------
def test_unknown_flag_is_a_clear_error():
    run = subprocess.run(
        [sys.executable, "-m", "di_router.sim.api_server", "--model", "m", "--bogus-flag", "1"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert run.returncode != 0
    assert "unrecognized arguments: --bogus-flag" in run.stderr


def test_invalid_kv_config_exits_non_zero_naming_the_field():
    config = _neuron(kv_parallel_size=1)
    run = subprocess.run(
        [sys.executable, "-m", "di_router.sim.api_server", "--kv-transfer-config", config],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert run.returncode != 0
    assert "kv_parallel_size" in run.stderr and "got 1" in run.stderr
    assert "Uvicorn running" not in run.stdout


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--kv-transfer-config", _neuron(kv_role="kv_sender")], "kv_role"),
        (["--kv-transfer-config", _neuron(kv_role=None)], "kv_role"),
        (["--kv-transfer-config", json.dumps({"kv_connector": "X"})], "kv_role"),
        (["--kv-transfer-config", _neuron(kv_parallel_size=1)], "kv_parallel_size"),
        (["--kv-transfer-config", _neuron(neuron_core_offset="thirty")], "neuron_core_offset"),
        (["--kv-transfer-config", _neuron(neuron_core_offset=1.5)], "neuron_core_offset"),
        (["--kv-transfer-config", _neuron(kv_port=70000)], "kv_port"),
        (["--kv-transfer-config", _neuron(kv_rank="first")], "kv_rank"),
        (["--kv-transfer-config", "{not json"], "--kv-transfer-config"),
        (["--override-neuron-config", "{not json"], "--override-neuron-config"),
        (["--max-num-seqs", "0"], "--max-num-seqs"),
        (["--max-model-len", "lots"], "--max-model-len"),
        (["--sim-eos-probability", "1.5"], "--sim-eos-probability"),
        (["--sim-profile", "trn9"], "--sim-profile"),
    ],
)
def test_invalid_settings_exit_2_naming_the_field(capsys, argv, named):
    with pytest.raises(SystemExit) as exc:
        api_server.main(argv)
    assert exc.value.code == 2
    assert named in capsys.readouterr().err


# -- roles and warnings (the parsing functions, in-process) --------------------------------------
@pytest.mark.parametrize(
    ("fields", "role"),
    [
        ({"kv_role": "kv_producer"}, Role.PREFILL),
        ({"kv_role": "kv_consumer"}, Role.DECODE),
        ({"kv_role": "kv_both"}, Role.BASELINE),
    ],
)
def test_role_comes_from_the_kv_config(monkeypatch, fields, role):
    monkeypatch.delenv("NEURON_RT_VISIBLE_CORES", raising=False)
    settings, warnings = parse_settings(["--kv-transfer-config", _neuron(**fields)])
    assert settings.role is role and warnings == []


def test_no_config_is_baseline_and_role_without_connector_warns(monkeypatch):
    monkeypatch.delenv("NEURON_RT_VISIBLE_CORES", raising=False)
    assert parse_settings([])[0].role is Role.BASELINE
    settings, warnings = parse_settings(["--kv-transfer-config", '{"kv_role": "kv_consumer"}'])
    assert settings.role is Role.BASELINE
    assert warnings == ["kv_role=kv_consumer without kv_connector: running as baseline"]


def test_numeric_string_core_offset_and_env_check(monkeypatch):
    monkeypatch.setenv("NEURON_RT_VISIBLE_CORES", "32-63")
    settings, warnings = parse_settings(["--kv-transfer-config", _neuron(neuron_core_offset="32")])
    assert settings.kv_config is not None and settings.kv_config.neuron_core_offset == 32
    assert warnings == []
    _, warnings = parse_settings(["--kv-transfer-config", _neuron(neuron_core_offset="0")])
    [warning] = warnings
    assert "neuron_core_offset=0" in warning and "Set neuron_core_offset to 32" in warning
    monkeypatch.setenv("NEURON_RT_VISIBLE_CORES", "lots")
    [warning] = parse_settings(["--kv-transfer-config", _neuron()])[1]
    assert "NEURON_RT_VISIBLE_CORES='lots' is not a core range" in warning


def test_every_tutorial_and_extra_flag_is_accepted(monkeypatch):
    monkeypatch.setenv("VLLM_API_KEY", "from-env")
    settings, _ = parse_settings(
        [
            "--model", "/m", "--max-num-seqs", "4", "--max-model-len", "8192",
            "--tensor-parallel-size", "32", "--device", "neuron", "--use-v2-block-manager",
            "--override-neuron-config", "{}", "--port", "8100", "--host", "127.0.0.1",
            "--served-model-name", "llama", "--block-size", "8192", "--dtype", "bfloat16",
            "--enable-prefix-caching", "--disable-log-requests", "--seed", "0",
        ]
    )  # fmt: skip
    assert (settings.model, settings.max_num_seqs, settings.port) == ("/m", 4, 8100)
    assert settings.model_name == "llama" and settings.api_key == "from-env"
    assert parse_settings(["--api-key", "cli"])[0].api_key == "cli"


# -- the tutorial's server.sh / baseline_server.sh, verbatim -------------------------------------
def _server_sh_config(role: str, rank: int, offset: str, kv_port: int) -> str:
    """TRANSFER_CONFIG of server.sh with NEURON_SEND_IP=127.0.0.1 (plus a free kv_port)."""
    return (
        "{\n"
        '            "kv_connector":"NeuronConnector",\n'
        '            "kv_buffer_device":"cpu",\n'
        f'            "kv_role":"{role}",\n'
        f'            "kv_rank":{rank},\n'
        '            "kv_parallel_size":2,\n'
        '            "kv_buffer_size":2e11,\n'
        '            "kv_ip":"127.0.0.1",\n'
        f'            "kv_port":{kv_port},\n'
        f'            "neuron_core_offset": {offset}\n'
        "      }"
    )


def _server_sh(batch: int, port: int, config: str | None) -> list[str]:
    argv = [
        "--model", TUTORIAL_MODEL,
        "--max-num-seqs", str(batch),
        "--max-model-len", "8192",
        "--tensor-parallel-size", "32",
        "--device", "neuron",
        "--use-v2-block-manager",
        "--override-neuron-config", "{}",
    ]  # fmt: skip
    if config is not None:
        argv += ["--kv-transfer-config", config]
    return [*argv, "--port", str(port)]


TUTORIAL_ENV = {
    "NEURON_RT_ASYNC_SENDRECV_BOOTSTRAP_PORT": "45645",
    "NEURON_RT_ASYNC_SENDRECV_EXPERIMENTAL_ENABLED": "1",
    "NEURON_COMPILED_ARTIFACTS": "di_traced_model_tp32_b4/",
    "NEURON_SEND_IP": "127.0.0.1",
    "NEURON_RECV_IP": "127.0.0.1",
    "NEURON_RT_ASYNC_EXEC_MAX_INFLIGHT_REQUESTS": "2",
}


@pytest.fixture(scope="module")
def tutorial_servers():
    """SEND=1 SINGLE_INSTANCE=1 ./server.sh, SINGLE_INSTANCE=1 ./server.sh, baseline_server.sh."""
    kv_port = free_port()
    prefill = sim_proc(
        "tutorial-prefill",
        _server_sh(4, free_port(), _server_sh_config("kv_producer", 0, "0", kv_port)),
        env={**TUTORIAL_ENV, "NEURON_RT_VISIBLE_CORES": "0-31"},
    )
    decode = sim_proc(
        "tutorial-decode",
        _server_sh(4, free_port(), _server_sh_config("kv_consumer", 1, '"32"', kv_port)),
        env={**TUTORIAL_ENV, "NEURON_RT_VISIBLE_CORES": "32-63"},
    )
    baseline = sim_proc(
        "tutorial-baseline",
        _server_sh(4, free_port(), None),
        env={"NEURON_COMPILED_ARTIFACTS": "x", "NEURON_RT_ASYNC_EXEC_MAX_INFLIGHT_REQUESTS": "2"},
    )
    with running(prefill, decode, baseline):
        yield prefill, decode, baseline


def test_tutorial_flags_start_each_role(tutorial_servers):
    for proc, role in zip(tutorial_servers, ("prefill", "decode", "baseline"), strict=True):
        stats = sim_stats(proc)
        assert stats["role"] == role and stats["max_num_seqs"] == 4
        log = proc.log()
        assert "WARNING" not in log, log
        assert f"simulated vLLM {role} server for {TUTORIAL_MODEL}" in log
        assert "INFO:     Uvicorn running on http://0.0.0.0:" in log
        models = httpx.get(proc.url + "/v1/models").json()["data"]
        assert [m["id"] for m in models] == [TUTORIAL_MODEL]


def test_tutorial_pair_matches_tutorial_baseline(tutorial_servers):
    prefill, decode, baseline = tutorial_servers
    body = {**completion_body("what is disaggregated inference", 6), "model": TUTORIAL_MODEL}
    p, d = paired(prefill, decode, COMPLETIONS, body, "tutorial-1")
    assert p.status_code == 200 and d.status_code == 200
    assert texts(d) == texts(post(baseline, COMPLETIONS, body))


# -- `di-router sim --role ...` ------------------------------------------------------------------
_DRIVER = """
import argparse, sys
from di_router.sim import cli
parser = argparse.ArgumentParser(prog="di-router")
cli.add_parser(parser.add_subparsers(dest="command", required=True))
args, extra = parser.parse_known_args()
args.passthrough = extra
sys.exit(args.func(args))
"""


def _di_router_sim_argv() -> list[str]:
    """`python -m di_router.cli sim`, or the same parser wiring if the umbrella CLI is broken.

    `di_router.cli` imports every subcommand's module; while the launcher modules are being
    written some may be missing, which must not hide whether `sim` itself works.
    """
    probe = subprocess.run(
        [sys.executable, "-m", "di_router.cli", "sim", "--help"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if probe.returncode == 0:
        return [sys.executable, "-m", "di_router.cli", "sim"]
    assert "ModuleNotFoundError" in probe.stderr or "ImportError" in probe.stderr, probe.stderr
    return [sys.executable, "-c", _DRIVER, "sim"]


def test_role_argv_builds_a_valid_vllm_command_line(monkeypatch):
    monkeypatch.delenv("NEURON_RT_VISIBLE_CORES", raising=False)
    assert role_argv("baseline", None, "127.0.0.1", 1) == ["--port", "8000"]
    for role, port in (("prefill", 8100), ("decode", 8200)):
        argv = role_argv(role, None, "10.0.0.1", 9000)
        assert argv[:2] == ["--port", str(port)]
        settings, warnings = parse_settings(argv)
        assert settings.role == role and warnings == []
        assert settings.kv_config is not None
        assert (settings.kv_config.kv_ip, settings.kv_config.kv_port) == ("10.0.0.1", 9000)


def test_di_router_sim_wrapper_runs_a_working_pair():
    base = _di_router_sim_argv()
    kv_port = free_port()
    procs = []
    for role in ("prefill", "decode"):
        port = free_port()
        argv = [*base, "--role", role, "--port", str(port), "--kv-port", str(kv_port),
                "--host", "127.0.0.1", "--sim-profile", "instant"]  # fmt: skip
        procs.append(Proc(f"wrapped-{role}", argv, f"http://127.0.0.1:{port}"))
    with running(*procs):
        prefill, decode = procs
        assert sim_stats(prefill)["role"] == "prefill" and sim_stats(decode)["role"] == "decode"
        p, d = paired(prefill, decode, COMPLETIONS, completion_body("wrapped", 4), "wrapped-1")
        assert p.status_code == 200 and len(texts(d)[0].split()) == 4


def test_consumer_warns_when_neuron_send_ip_is_not_its_kv_ip(monkeypatch):
    monkeypatch.delenv("NEURON_RT_VISIBLE_CORES", raising=False)
    monkeypatch.setenv("NEURON_SEND_IP", "10.0.0.9")
    consumer = ["--kv-transfer-config", _neuron(kv_role="kv_consumer", kv_ip="10.0.0.1")]
    [warning] = parse_settings(consumer)[1]
    assert "kv_ip=10.0.0.1 but NEURON_SEND_IP=10.0.0.9" in warning
    producer = ["--kv-transfer-config", _neuron(kv_role="kv_producer", kv_ip="10.0.0.1")]
    assert parse_settings(producer)[1] == []
    monkeypatch.setenv("NEURON_SEND_IP", "10.0.0.1")
    assert parse_settings(consumer)[1] == []
