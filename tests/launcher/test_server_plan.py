"""Golden tests: what `server.sh` / `baseline_server.sh` intend, with the tutorial's bugs fixed.

Fixed bugs checked here: the decode offset is the integer 32 (not the string "32"), the IPs
come from the flags (the tutorial's commands pass flags its script never parses), and the
single-instance baseline exports NEURON_RT_VISIBLE_CORES=0-31.
"""

from __future__ import annotations

import json
import sys

import pytest

from di_router.kv_config import parse_kv_transfer_config
from di_router.launcher.server_plan import plan_server
from di_router.sim.args import parse_settings
from tests.launcher.launcher_helpers import settings

MODEL = "/models/Llama-3.3-70B-Instruct"
SINGLE = ["--topology", "single-instance", "--tp-degree", "32", "--batch-size", "4"]
MULTI = [
    "--topology", "multi-instance", "--tp-degree", "64", "--batch-size", "4",
    "--prefill-ip", "10.0.0.1", "--decode-ip", "10.0.0.2",
]  # fmt: skip

DI_ENV = {
    "NEURON_RT_ASYNC_SENDRECV_BOOTSTRAP_PORT": "45645",
    "NEURON_RT_ASYNC_SENDRECV_EXPERIMENTAL_ENABLED": "1",
    "NEURON_RT_ASYNC_EXEC_MAX_INFLIGHT_REQUESTS": "2",
}
KV_COMMON = {
    "kv_connector": "NeuronConnector",
    "kv_buffer_device": "cpu",
    "kv_parallel_size": 2,
    "kv_buffer_size": 2e11,
}
PRODUCER = KV_COMMON | {"kv_role": "kv_producer", "kv_rank": 0}
CONSUMER = KV_COMMON | {"kv_role": "kv_consumer", "kv_rank": 1}

# (role, topology flags) -> (env, KVTransferConfig JSON as a dict or None, port, tp)
GOLDEN = {
    ("prefill", "single"): (
        DI_ENV | {
            "NEURON_COMPILED_ARTIFACTS": "di_traced_model_tp32_b4/",
            "NEURON_SEND_IP": "127.0.0.1",
            "NEURON_RECV_IP": "127.0.0.1",
            "NEURON_RT_VISIBLE_CORES": "0-31",
        },
        PRODUCER | {"kv_ip": "127.0.0.1", "neuron_core_offset": 0},
        8100,
        32,
    ),
    ("decode", "single"): (
        DI_ENV | {
            "NEURON_COMPILED_ARTIFACTS": "di_traced_model_tp32_b4/",
            "NEURON_SEND_IP": "127.0.0.1",
            "NEURON_RECV_IP": "127.0.0.1",
            "NEURON_RT_VISIBLE_CORES": "32-63",
        },
        CONSUMER | {"kv_ip": "127.0.0.1", "neuron_core_offset": 32},
        8200,
        32,
    ),
    ("baseline", "single"): (
        {
            "NEURON_COMPILED_ARTIFACTS": "di_traced_model_tp32_b4/",
            "NEURON_RT_ASYNC_EXEC_MAX_INFLIGHT_REQUESTS": "2",
            "NEURON_RT_VISIBLE_CORES": "0-31",
        },
        None,
        8000,
        32,
    ),
    ("prefill", "multi"): (
        DI_ENV | {
            "NEURON_COMPILED_ARTIFACTS": "di_traced_model_tp64_b4/",
            "NEURON_SEND_IP": "10.0.0.1",
            "NEURON_RECV_IP": "10.0.0.2",
        },
        PRODUCER | {"kv_ip": "10.0.0.1", "neuron_core_offset": 0},
        8100,
        64,
    ),
    ("decode", "multi"): (
        DI_ENV | {
            "NEURON_COMPILED_ARTIFACTS": "di_traced_model_tp64_b4/",
            "NEURON_SEND_IP": "10.0.0.1",
            "NEURON_RECV_IP": "10.0.0.2",
        },
        CONSUMER | {"kv_ip": "10.0.0.1", "neuron_core_offset": 0},
        8200,
        64,
    ),
    ("baseline", "multi"): (
        {
            "NEURON_COMPILED_ARTIFACTS": "di_traced_model_tp64_b4/",
            "NEURON_RT_ASYNC_EXEC_MAX_INFLIGHT_REQUESTS": "2",
        },
        None,
        8000,
        64,
    ),
}  # fmt: skip


def expected_argv(module: str, kv: dict | None, port: int, tp: int) -> list[str]:
    kv_flags = [] if kv is None else ["--kv-transfer-config", json.dumps(kv)]
    return [
        sys.executable, "-m", module,
        "--model", MODEL,
        "--max-num-seqs", "4",
        "--max-model-len", "8192",
        "--tensor-parallel-size", str(tp),
        "--device", "neuron",
        "--use-v2-block-manager",
        "--override-neuron-config", "{}",
        *kv_flags,
        "--port", str(port),
    ]  # fmt: skip


def plan(role: str, topology: str, *extra: str):
    flags = SINGLE if topology == "single" else MULTI
    return plan_server(role, settings(["serve", role, "--model-path", MODEL, *flags, *extra]))


def normalised_argv(argv: list[str]) -> list[str]:
    """The argv with the KV JSON parsed back, so key order does not matter but values do."""
    out = list(argv)
    if "--kv-transfer-config" in out:
        i = out.index("--kv-transfer-config") + 1
        out[i] = json.loads(out[i])
    return out


@pytest.mark.parametrize(("role", "topology"), list(GOLDEN))
def test_vllm_plan_matches_tutorial(role: str, topology: str) -> None:
    env, kv, port, tp = GOLDEN[role, topology]
    got = plan(role, topology)
    assert got.env == env
    assert got.port == port
    expected = expected_argv("vllm.entrypoints.openai.api_server", kv, port, tp)
    assert normalised_argv(got.argv) == normalised_argv(expected)
    if kv is None:
        assert got.kv_config is None
        return
    sent = json.loads(got.argv[got.argv.index("--kv-transfer-config") + 1])
    assert sent == kv
    assert type(sent["neuron_core_offset"]) is int  # the tutorial passed the string "32"
    # The simulator and vLLM validate with this model; the offset agrees with the cores.
    parsed = parse_kv_transfer_config(got.kv_config.to_cli_json())
    assert parsed == got.kv_config
    assert parsed.core_offset_warning(env.get("NEURON_RT_VISIBLE_CORES")) is None


@pytest.mark.parametrize(("role", "topology"), list(GOLDEN))
def test_sim_engine_gets_identical_argv_and_env(
    role: str, topology: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    vllm = plan(role, topology)
    sim = plan(role, topology, "--engine", "sim")
    assert sim.argv[:3] == [sys.executable, "-m", "di_router.sim.api_server"]
    assert sim.argv[3:] == vllm.argv[3:]
    assert sim.env == vllm.env
    # The simulator accepts that argv under that environment without a warning.
    monkeypatch.delenv("NEURON_RT_VISIBLE_CORES", raising=False)
    for name, value in sim.env.items():
        monkeypatch.setenv(name, value)
    sim_settings, warnings = parse_settings(sim.argv[3:])
    assert warnings == []
    assert sim_settings.kv_config == sim.kv_config


def test_sim_profile_and_kv_port_pass_through() -> None:
    sim = ["--engine", "sim", "--sim-profile", "instant"]
    got = plan("decode", "single", *sim, "--kv-port", "9999")
    assert got.argv[-2:] == ["--sim-profile", "instant"]
    assert got.kv_config.kv_port == 9999
    assert json.loads(got.argv[got.argv.index("--kv-transfer-config") + 1])["kv_port"] == 9999


def test_custom_core_ranges_set_matching_offsets() -> None:
    got = plan("decode", "single", "--tp-degree", "16", "--decode-cores", "40-55")
    assert got.env["NEURON_RT_VISIBLE_CORES"] == "40-55"
    assert got.kv_config.neuron_core_offset == 40
